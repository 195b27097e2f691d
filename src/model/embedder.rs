//! `Clip`: a loaded checkpoint with its tokenizer and preprocessing, the one
//! object the rest of clipdex embeds texts and images with.

use std::cell::Cell;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use rayon::prelude::*;

use super::checkpoint::{self, CheckpointFiles, HubOptions, Layout, ModelSource, WeightsFile};
use super::tensor_file::TensorFile;
use super::tokenizer::TokenizerSettings;
use super::{
    ClipConfig, ClipModel, Error, Family, Preprocessor, Result, RgbView, TextTokenizer, Towers,
    load_weights, normalize,
};

/// Texts embedded per forward pass.
const TEXT_BATCH: usize = 64;

/// Texts that must share a beginning for it to go through the text tower
/// once for all of them ([`shared_beginnings`]).
const SHARED_GROUP: usize = 16;

pub use crate::common::{ModelInfo, Precision};

/// A ready-to-use model of any family.
#[derive(Debug)]
pub struct Clip {
    model: ClipModel,
    tokenizer: TextTokenizer,
    preprocessor: Preprocessor,
    info: ModelInfo,
    device: Device,
}

impl Clip {
    /// Loads a model from a folder or the hub.
    pub fn load(source: &ModelSource, hub: &HubOptions) -> Result<Self> {
        Self::resolve_and_load(source, hub, Towers::Both)
    }

    /// Finds the checkpoint's files (downloading them if need be) and loads
    /// them, converting layers as they load if a caller asked
    /// (`converting_on_load`).
    fn resolve_and_load(source: &ModelSource, hub: &HubOptions, towers: Towers) -> Result<Self> {
        let files = checkpoint::resolve(source, hub)?;
        Self::from_files_with(&files, source.id(), towers)
    }

    /// Loads a model in `precision`. A `fast` or `int8` one has its encoder
    /// layers converted one by one as they load, so that loading peaks near
    /// the reduced model's size rather than the f32 one's.
    pub fn load_with(source: &ModelSource, hub: &HubOptions, precision: Precision) -> Result<Self> {
        Self::load_towers(source, hub, precision, Towers::Both)
    }

    /// [`Self::load_with`], the image tower loaded when `towers` says.
    pub fn load_towers(
        source: &ModelSource,
        hub: &HubOptions,
        precision: Precision,
        towers: Towers,
    ) -> Result<Self> {
        let load = || Self::resolve_and_load(source, hub, towers);
        let mut clip = match precision {
            Precision::Exact => load()?,
            Precision::Fast | Precision::Int8 => super::bf16::converting_on_load(precision, load)?,
        };
        clip.set_precision(precision)?;
        Ok(clip)
    }

    /// Loads a model from resolved checkpoint files.
    pub fn from_files(files: &CheckpointFiles, id: String) -> Result<Self> {
        Self::from_files_with(files, id, Towers::Both)
    }

    /// [`Self::from_files`], the image tower loaded when `towers` says
    /// (a Hugging Face safetensors checkpoint's; others load both at once).
    pub fn from_files_with(files: &CheckpointFiles, id: String, towers: Towers) -> Result<Self> {
        let model_config = files.read_config()?;
        let config = &model_config.config;
        // The tokenizer is parsed (CLIP's 2 MB `tokenizer.json`: a quarter
        // of a text-only load) while the weights load; errors are reported
        // in the order the parts are named: tokenizer, preprocessor, weights.
        let (tokenizer, rest) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| read_tokenizer(files, config));
            let rest = files
                .read_preprocessor(&model_config)
                .and_then(|preprocessor| Ok((preprocessor, read_model(files, config, towers)?)));
            let tokenizer = tokenizer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (tokenizer, rest)
        });
        let tokenizer = tokenizer?;
        let ((preprocessor, preprocessor_text), model) = rest?;
        let image_size = config.vision_config.image_size;
        let device = Device::Cpu;
        let fingerprint = fingerprint(config, &preprocessor_text, &files.weights)?;
        let info = ModelInfo {
            id,
            fingerprint,
            embedding_dim: config.text_output_dim(),
            image_size,
            context_length: tokenizer.max_len(),
            family: config.family.name().into(),
            precision: Precision::Exact,
        };
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            info,
            device,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Switches the towers to `precision` (from exact, as loaded; a model
    /// is switched once). The fingerprint then names the precision too
    /// (`<hash>/fast`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == self.info.precision {
            return Ok(());
        }
        if self.info.precision != Precision::Exact {
            return Err(Error::Input(format!(
                "a {} model cannot change to {precision}: load it again",
                self.info.precision
            )));
        }
        self.model.reduce_to(precision)?;
        self.info.precision = precision;
        // Vectors of another precision are another model's to an index:
        // every check that compares fingerprints refuses to mix them.
        self.info.fingerprint = format!("{}/{precision}", self.info.fingerprint);
        Ok(())
    }

    pub fn config(&self) -> &ClipConfig {
        self.model.config()
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `exp(t)`, the factor from cosine similarity to logits.
    pub fn logit_scale(&self) -> Result<f32> {
        Ok(self.model.logit_scale().exp()?.to_scalar::<f32>()?)
    }

    /// How a SigLIP model turns cosine similarity into a match probability;
    /// none for CLIP, whose cosines are not calibrated.
    pub fn calibration(&self) -> Result<Option<Calibration>> {
        Ok(match self.logit_bias()? {
            Some(bias) => Some(Calibration {
                scale: self.logit_scale()?,
                bias,
            }),
            None => None,
        })
    }

    /// SigLIP's `b`, added to `exp(t) * cos` in the logits; none for CLIP.
    pub fn logit_bias(&self) -> Result<Option<f32>> {
        Ok(match self.model.logit_bias() {
            Some(b) => Some(b.to_scalar::<f32>()?),
            None => None,
        })
    }

    /// Projected, unnormalised features of tokenised texts, (batch, dim).
    ///
    /// A CLIP batch is padded to its longest text only; the causal mask makes
    /// the padding irrelevant, so short queries do not pay for 77 positions.
    /// SigLIP rows come from the tokenizer at their fixed length.
    pub fn text_features<R: AsRef<[u32]>>(&self, batch: &[R]) -> Result<Tensor> {
        let mut len = batch.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        if len == 0 {
            return Err(Error::Input("no tokens to embed".into()));
        }
        // open_clip's text towers without a causal mask attend over the
        // padding too: rows are the whole context, as the reference's are.
        let text = &self.config().text_config;
        if self.config().family == Family::Clip && text.no_causal_mask {
            len = len.max(text.max_position_embeddings);
        }
        let (ids, pool) = self.padded(batch, len)?;
        on_pool(|| self.model.get_text_features(&ids, &pool))
    }

    /// The rows' tokens, each padded to `len`, as a (rows, len) tensor; and
    /// each row's pooled position.
    fn padded<R: AsRef<[u32]>>(&self, batch: &[R], len: usize) -> Result<(Tensor, Vec<usize>)> {
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut pool = Vec::with_capacity(batch.len());
        for row in batch.iter().map(AsRef::as_ref) {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, len - row.len()));
            pool.push(self.tokenizer.pool_position(row));
        }
        let ids = Tensor::from_vec(ids, (batch.len(), len), &self.device)?;
        Ok((ids, pool))
    }

    /// Preprocesses images into a (batch, 3, size, size) tensor, in parallel.
    pub fn pixels(&self, images: &[RgbView]) -> Result<Tensor> {
        let s = self.preprocessor.image_size();
        let mut data = vec![0f32; images.len() * 3 * s * s];
        data.par_chunks_mut(3 * s * s)
            .zip(images.par_iter())
            .for_each(|(out, image)| {
                let crop = self.preprocessor.resize_and_crop(*image);
                self.preprocessor.normalize_into(&crop, out);
            });
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, s, s),
            &self.device,
        )?)
    }

    /// Projected, unnormalised features of preprocessed pixels, (batch, dim).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        on_pool(|| self.model.get_image_features(pixels))
    }

    /// L2-normalised embeddings of `n` images already preprocessed into
    /// `data`, (n, 3, size, size) channels first.
    pub fn embed_pixels(&self, data: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let s = self.preprocessor.image_size();
        let pixels = Tensor::from_vec(data, (n, 3, s, s), &self.device)?;
        Ok(normalize(&self.image_features(&pixels)?)?.to_vec2::<f32>()?)
    }

    /// [`Self::text_features`] of a batch for a causal tower: the tokens all
    /// its texts begin with ([`common_beginning`], stopping before any
    /// text's pooled token) go through the tower once for all of them, each
    /// text's own tokens after them unpadded
    /// ([`ClipModel::get_text_features_after`]); a single text, or texts
    /// that share nothing, take the plain path.
    fn text_features_shared(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let pool: Vec<usize> = batch
            .iter()
            .map(|row| self.tokenizer.pool_position(row))
            .collect();
        let first = common_beginning(batch).min(pool.iter().copied().min().unwrap_or(0));
        if first == 0 || batch.len() < 2 {
            return self.text_features(batch);
        }
        let beginning = &batch[0][..first];
        let own: Vec<&[u32]> = batch.iter().map(|row| &row[first..]).collect();
        on_pool(|| self.model.get_text_features_after(beginning, &own, &pool))
    }

    /// L2-normalised embeddings of texts, in their order.
    ///
    /// In a causal tower, texts go through in batches that compute their
    /// common beginning once (at least the start token; prompts of one
    /// template, "a photo of a {}.", share more: [`shared_beginnings`]
    /// groups them), each text's own tokens unpadded, so a batch of mixed
    /// lengths costs the tokens it holds. Other towers pad a batch to its
    /// longest text (SigLIP's to its fixed length), so texts go in batches
    /// of similar length.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let shares = self.model.shares_text_beginnings();
        let groups = match shares {
            true => shared_beginnings(&ids, SHARED_GROUP),
            false => vec![(0, (0..ids.len()).collect())],
        };
        let mut out = vec![Vec::new(); texts.len()];
        for (_, mut group) in groups {
            group.sort_by_key(|&i| ids[i].len());
            for chunk in group.chunks(TEXT_BATCH) {
                let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
                let features = match shares {
                    true => self.text_features_shared(&batch)?,
                    false => self.text_features(&batch)?,
                };
                for (&i, row) in chunk.iter().zip(normalize(&features)?.to_vec2::<f32>()?) {
                    out[i] = row;
                }
            }
        }
        Ok(out)
    }

    /// One unit vector per class from its prompts: the mean of the prompts'
    /// normalised embeddings, normalised (the paper's prompt ensembling).
    /// Every prompt of every class goes through the text tower in shared
    /// batches.
    pub fn ensemble(&self, classes: &[Vec<String>]) -> Result<Vec<Vec<f32>>> {
        let prompts: Vec<&str> = classes.iter().flatten().map(String::as_str).collect();
        if classes.iter().any(Vec::is_empty) {
            return Err(Error::Input("a class without prompts".into()));
        }
        let embedded = self.embed_texts(&prompts)?;
        let mut rows = embedded.into_iter();
        Ok(classes
            .iter()
            .map(|c| {
                let mut mean = vec![0f32; self.info().embedding_dim];
                for e in rows.by_ref().take(c.len()) {
                    mean.iter_mut().zip(&e).for_each(|(m, x)| *m += x);
                }
                let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|x| *x /= norm);
                mean
            })
            .collect())
    }

    /// L2-normalised embeddings of images, in one batch.
    pub fn embed_images(&self, images: &[RgbView]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let features = self.image_features(&self.pixels(images)?)?;
        Ok(normalize(&features)?.to_vec2::<f32>()?)
    }
}

/// The tokenizer of `files`, checked against the model's vocabulary.
fn read_tokenizer(files: &CheckpointFiles, config: &ClipConfig) -> Result<TextTokenizer> {
    let settings = match &files.tokenizer_config {
        Some(path) => TokenizerSettings::from_json(&checkpoint::read_text(path)?)?,
        None => TokenizerSettings::default(),
    };
    let tokenizer = TextTokenizer::for_config(config, &files.tokenizer, &settings)?;
    if tokenizer.max_id() as usize >= config.text_config.vocab_size {
        return Err(Error::Config(format!(
            "the tokenizer has ids up to {}, outside the model's vocabulary of {}",
            tokenizer.max_id(),
            config.text_config.vocab_size
        )));
    }
    Ok(tokenizer)
}

/// The model of `files`, its image tower loaded when `towers` says.
fn read_model(files: &CheckpointFiles, config: &ClipConfig, towers: Towers) -> Result<ClipModel> {
    let device = Device::Cpu;
    Ok(match (&files.layout, &files.weights) {
        // The token table stays in the file, read a row at a time.
        (Layout::HuggingFace, WeightsFile::Safetensors(path)) => {
            let file = TensorFile::open(path)?;
            let vb = VarBuilder::from_backend(Box::new(file.clone()), DType::F32, device.clone());
            match towers {
                Towers::Both => ClipModel::from_file(vb, config, Some(&file))?,
                Towers::TextFirst => ClipModel::from_file_text_first(vb, config, Some(&file))?,
            }
        }
        (Layout::HuggingFace, _) => ClipModel::new(load_weights(&files.weights, &device)?, config)?,
        // Renamed weights in memory, the text tower's table in the file.
        (Layout::OpenClip, WeightsFile::Safetensors(path)) => {
            let file = TensorFile::open(path)?;
            let tables: Vec<(&str, &str)> = super::open_clip::TEXT_TABLES
                .into_iter()
                .filter(|(stored, _)| file.contains_tensor(stored))
                .collect();
            let left: Vec<&str> = tables.iter().map(|(stored, _)| *stored).collect();
            let tensors =
                super::open_clip::remap_leaving(file.read_all_but(&left)?, config, &left)?;
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
            ClipModel::from_file(vb, config, Some(&file.renamed(&tables)))?
        }
        (Layout::OpenClip, _) => ClipModel::new(
            VarBuilder::from_tensors(files.read_tensors(config)?, DType::F32, &device),
            config,
        )?,
    })
}

/// The tokens all of `batch` begin with, short of the last token of the
/// shortest (every text keeps one of its own).
fn common_beginning(batch: &[&[u32]]) -> usize {
    let Some((head, rest)) = batch.split_first() else {
        return 0;
    };
    let shortest = batch.iter().map(|row| row.len()).min().unwrap_or(0);
    let mut n = shortest.saturating_sub(1);
    for row in rest {
        n = n.min(head.iter().zip(*row).take_while(|(a, b)| a == b).count());
    }
    n
}

/// Groups texts (token ids) by a shared beginning: each joins the longest
/// beginning, short of its last token, that at least `min_group` texts
/// share, or none (0). Returns each group's beginning length and its texts'
/// indices, in the order of their first text.
///
/// The tag vocabulary's prompts fall into one group per template (619
/// names each), whose beginnings are 5 to 8 tokens of 8 to 14.
fn shared_beginnings(ids: &[Vec<u32>], min_group: usize) -> Vec<(usize, Vec<usize>)> {
    // A trie of the texts' beginnings: node 0 is the empty one.
    let mut child: std::collections::HashMap<(usize, u32), usize> = Default::default();
    let mut count = vec![ids.len()];
    let paths: Vec<Vec<usize>> = ids
        .iter()
        .map(|row| {
            let mut path = vec![0];
            let mut node = 0;
            for &token in &row[..row.len().saturating_sub(1)] {
                node = *child.entry((node, token)).or_insert_with(|| {
                    count.push(0);
                    count.len() - 1
                });
                count[node] += 1;
                path.push(node);
            }
            path
        })
        .collect();
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut group_of: std::collections::HashMap<usize, usize> = Default::default();
    for (i, path) in paths.iter().enumerate() {
        let depth = path
            .iter()
            .rposition(|&n| count[n] >= min_group)
            .unwrap_or(0);
        let g = *group_of.entry(path[depth]).or_insert_with(|| {
            groups.push((depth, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups
}

/// Runs `f` on a thread of rayon's pool (at once, if this is one), with
/// the pool's other threads kept awake for its parallel work. A forward
/// pass makes a hundred or more parallel products and passes; begun from a
/// thread outside the pool, each one would be handed to the pool and waited
/// for, two thread switches apiece, which cost a 10-token query a quarter of
/// its time (6.5 to 4.9 ms, `cargo bench --bench model -- --only text`).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return kept_awake(f);
    }
    rayon::join(|| kept_awake(f), || ()).0
}

thread_local! {
    /// Whether this thread runs a forward pass or keeps awake for one.
    static IN_PASS: Cell<bool> = const { Cell::new(false) };
}

/// How long a kept-awake thread looks for work without finding any before
/// it goes back to rayon's own idling (which sleeps within microseconds).
/// Longer than any serial step of a pass; bounded so that a thread which
/// took this watch on top of other work returns to it.
const AWAKE_IDLE: Duration = Duration::from_millis(2);

/// Runs `f` with the pool's other threads spinning for work until it ends.
///
/// rayon parks an idle thread after a few dozen yields, and waking it
/// takes a futex call and a scheduler pass on each side: between two
/// products of a pass, the other thread had always fallen asleep, so every
/// product began on one thread, and a fifth of the time went to waking
/// (ViT-B/32 int8 at batch 1: 84 to 119 images/s with threads kept awake,
/// `cargo bench --bench model`). A thread kept awake steals the pass's
/// work as soon as it is pushed, and any other work the pool is given, as
/// rayon's own `yield_now` does. Nested passes and threads already busy
/// with one run plainly; a watcher that finds no work for
/// [`AWAKE_IDLE`] leaves, so none waits on a pass that waits on it.
fn kept_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if IN_PASS.get() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(|_| watch(&done));
        }
        let _pass = PassGuard::enter(&done);
        f()
    })
}

/// Marks this thread as running a pass; on drop (the pass ended or
/// panicked) tells the watchers and clears the mark.
struct PassGuard<'a> {
    done: &'a AtomicBool,
}

impl<'a> PassGuard<'a> {
    fn enter(done: &'a AtomicBool) -> Self {
        IN_PASS.set(true);
        Self { done }
    }
}

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        IN_PASS.set(false);
        self.done.store(true, Ordering::Release);
    }
}

/// Keeps this pool thread looking for work until `done`, or until none
/// came for [`AWAKE_IDLE`].
fn watch(done: &AtomicBool) {
    if IN_PASS.replace(true) {
        return;
    }
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            _ => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() > AWAKE_IDLE {
                    break;
                }
                std::hint::spin_loop();
            }
        }
    }
    IN_PASS.set(false);
}

/// SigLIP's sigmoid over its logits: `p = sigmoid(scale * cos + bias)`, the
/// probability the model gives that an image and a text match (trained on
/// pairs, so meaningful for text queries).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// `exp(t)`.
    pub scale: f32,
    pub bias: f32,
}

impl Calibration {
    pub fn probability(&self, cosine: f32) -> f32 {
        1.0 / (1.0 + (-(self.scale * cosine + self.bias)).exp())
    }

    /// The cosine at which the probability is `p`: `(logit(p) - bias) / scale`
    /// (minus infinity at 0, infinity at 1).
    pub fn cosine_at(&self, p: f32) -> f32 {
        let logit = (p as f64 / (1.0 - p as f64)).ln();
        ((logit - self.bias as f64) / self.scale as f64) as f32
    }
}

/// Hashes what decides the embedding space: the parsed config, the
/// preprocessing, and the weights (size plus 64 evenly spaced 4 KiB samples,
/// so a fine-tuned copy of the same architecture gets another fingerprint
/// without reading gigabytes).
fn fingerprint(config: &ClipConfig, preprocessor: &str, weights: &WeightsFile) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(config.to_json().as_bytes());
    hasher.update(preprocessor.as_bytes());
    let path = match weights {
        WeightsFile::Safetensors(p) | WeightsFile::Pickle(p) => p,
    };
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    hasher.update(&len.to_le_bytes());
    const SAMPLES: u64 = 64;
    const SAMPLE: usize = 4096;
    let mut buf = vec![0u8; SAMPLE];
    for i in 0..SAMPLES {
        let offset = len.saturating_sub(SAMPLE as u64) * i / (SAMPLES - 1);
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let n = file.read(&mut buf).map_err(io)?;
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_join_the_longest_beginning_enough_of_them_share() {
        // Start token 0, end token 9: two templates (1 2 and 1 3) of four
        // names, the names 4 and 4 5 twice beginning alike, and two others.
        let mut ids: Vec<Vec<u32>> = Vec::new();
        for template in [2, 3] {
            for name in [&[4][..], &[4, 5], &[6], &[7, 8]] {
                ids.push([&[0, 1, template][..], name, &[9]].concat());
            }
        }
        ids.push(vec![0, 1, 9]);
        ids.push(vec![0, 6, 6, 9]);
        let groups = shared_beginnings(&ids, 4);
        // The others share what all ten do: the start token, and "1" with
        // the templates' eight.
        assert_eq!(
            groups,
            vec![
                (3, vec![0, 1, 2, 3]),
                (3, vec![4, 5, 6, 7]),
                (2, vec![8]),
                (1, vec![9])
            ]
        );
        // Smaller groups: the two names beginning with 4 share one more.
        let groups = shared_beginnings(&ids, 2);
        assert_eq!(groups[0], (4, vec![0, 1]));
        assert_eq!(groups[1], (3, vec![2, 3]));
        // Every text keeps a token of its own after its beginning, and
        // begins with its group's.
        for min in 1..=ids.len() {
            let groups = shared_beginnings(&ids, min);
            let mut seen: Vec<usize> = groups.iter().flat_map(|g| g.1.clone()).collect();
            seen.sort();
            assert_eq!(seen, (0..ids.len()).collect::<Vec<_>>());
            for (first, rows) in groups {
                for &i in &rows {
                    assert!(first < ids[i].len());
                    assert_eq!(ids[i][..first], ids[rows[0]][..first]);
                }
            }
        }
        assert!(shared_beginnings(&[], 4).is_empty());
    }

    #[test]
    fn a_batch_shares_what_all_its_texts_begin_with_short_of_the_last_token() {
        let a: &[u32] = &[0, 1, 2, 3, 9];
        assert_eq!(common_beginning(&[a, &[0, 1, 2, 4, 5, 9]]), 3);
        assert_eq!(common_beginning(&[a, &[0, 1, 9]]), 2);
        // The same text twice, or alone, keeps its last token.
        assert_eq!(common_beginning(&[a, a]), 4);
        assert_eq!(common_beginning(&[a]), 4);
        assert_eq!(common_beginning(&[a, &[5, 9]]), 0);
        assert_eq!(common_beginning(&[a, &[0]]), 0);
        assert_eq!(common_beginning(&[]), 0);
    }

    /// A pass's worth of parallel steps with serial work between them.
    fn pass(seed: u64) -> u64 {
        (0..40u64)
            .map(|step| {
                let serial: u64 = (0..2_000u64).map(|i| i ^ step).sum();
                let parallel: u64 = (0..20_000u64).into_par_iter().map(|i| (i * seed) % 7).sum();
                serial + parallel
            })
            .sum()
    }

    #[test]
    fn a_pass_with_the_pool_kept_awake_gives_what_it_gives_plainly() {
        for seed in 1..4 {
            assert_eq!(on_pool(|| pass(seed)), pass(seed));
        }
    }

    #[test]
    fn passes_from_many_threads_and_nested_passes_all_finish() {
        // Passes begun from outside the pool, from inside it, and inside
        // one another, all at once: none may wait on another forever.
        let outside: Vec<_> = (0..6)
            .map(|t| std::thread::spawn(move || on_pool(|| pass(t) + on_pool(|| pass(t + 1)))))
            .collect();
        let inside: Vec<u64> = (0..6u64)
            .into_par_iter()
            .map(|t| on_pool(|| pass(t)))
            .collect();
        for (t, thread) in outside.into_iter().enumerate() {
            let t = t as u64;
            assert_eq!(thread.join().unwrap(), pass(t) + pass(t + 1));
        }
        assert_eq!(inside, (0..6).map(pass).collect::<Vec<_>>());
        assert!(!IN_PASS.get(), "the mark is cleared after the passes");
    }

    #[test]
    fn a_pass_that_panics_releases_the_pool() {
        let caught = std::panic::catch_unwind(|| {
            on_pool(|| {
                pass(1);
                panic!("a failed pass")
            })
        });
        assert!(caught.is_err());
        // The watchers of the failed pass left: the next pass runs.
        assert_eq!(on_pool(|| pass(2)), pass(2));
    }
}
