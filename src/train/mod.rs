//! Training and fine-tuning with CLIP's softmax contrastive objective or
//! SigLIP's sigmoid one (`model::loss::Objective`).
//!
//! A model starts from a checkpoint (fine-tuning, CLIP or SigLIP) or a config
//! preset (from scratch, initialised as transformers does). Towers can be
//! frozen: the image tower, the text tower, or both (only the projections or
//! SigLIP's heads, the temperature and the bias learn, in the spirit of
//! locked-image tuning, Zhai et al. 2022). Frozen
//! weights are plain tensors and take the fast inference path; trainable ones
//! are candle `Var`s, whose layers use only differentiable operations.
//!
//! The output folder is a Hugging Face checkpoint (config.json,
//! model.safetensors, tokenizer files, preprocessor_config.json), rewritten
//! after every epoch, plus `checkpoint/` (weights, optimiser moments, step and
//! the run's settings), from which a killed run resumes exactly: data order
//! and augmentation depend only on the seed, the epoch and the sample.

pub mod data;
pub mod metrics;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::{Deserialize, Serialize};

use crate::model::checkpoint::{self, HubOptions, ModelSource, TokenizerFiles};
use crate::model::loss::{Objective, SIGMOID_INIT_BIAS, SIGMOID_INIT_LOG_SCALE};
use crate::model::tokenizer::TokenizerSettings;
use crate::model::{ClipConfig, ClipModel, Family, Preprocessor, TextTokenizer, init};
use data::{Dataset, ImageSet, Problem, Sample};
use optim::{AdamW, AdamWConfig, learning_rate};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] crate::model::Error),
    #[error(transparent)]
    Optimizer(#[from] optim::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Resume(String),
    #[error("training stopped; resume by running the same command")]
    Stopped,
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Keeps the step log's whole lines up to `step` (where a resumed run
/// restarts): a killed run may have left a torn last line, and steps past
/// its last checkpoint are run again.
fn trim_steps_log(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut kept = Vec::with_capacity(text.len());
    for line in text
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
    {
        let done = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if done.is_some_and(|d| d <= step) {
            kept.extend_from_slice(line);
        }
    }
    if kept.len() != text.len() {
        crate::common::fs::write_synced(path, &kept).map_err(io(path))?;
    }
    Ok(())
}

/// Where the weights start.
#[derive(Clone, Debug)]
pub enum Start {
    /// Fine-tune a checkpoint (folder or hub id).
    Checkpoint(ModelSource),
    /// Train from scratch with this architecture.
    Scratch(ClipConfig),
}

/// Which weights stay fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Everything learns.
    None,
    /// The image tower is fixed (its projection learns).
    Image,
    /// The text tower is fixed (its projection learns).
    Text,
    /// Both towers are fixed; only the projections and the temperature learn.
    Towers,
}

impl std::str::FromStr for Freeze {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Freeze::None),
            "image" => Ok(Freeze::Image),
            "text" => Ok(Freeze::Text),
            "towers" => Ok(Freeze::Towers),
            other => Err(format!("{other:?} is not one of none, image, text, towers")),
        }
    }
}

impl Freeze {
    /// Whether a weight stays fixed. SigLIP's towers end in their heads
    /// (`*.head.*`), which play the part of CLIP's projections and learn.
    fn frozen(self, name: &str) -> bool {
        let image = name.starts_with("vision_model.") && !name.starts_with("vision_model.head.");
        let text = name.starts_with("text_model.") && !name.starts_with("text_model.head.");
        match self {
            Freeze::None => false,
            Freeze::Image => image,
            Freeze::Text => text,
            Freeze::Towers => image || text,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: PathBuf,
    /// Validation data; without it a deterministic share of `data` is held out.
    pub val: Option<PathBuf>,
    pub val_percent: f64,
    pub out: PathBuf,
    pub start: Start,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Warm-up steps (linear), then cosine decay; default 5% of the run.
    pub warmup: Option<u64>,
    pub weight_decay: f64,
    pub seed: u64,
    pub freeze: Freeze,
    /// The objective; by default the model family's own (softmax for CLIP,
    /// sigmoid for SigLIP).
    pub loss: Option<Objective>,
    /// Templates that turn class names into captions.
    pub templates: Vec<String>,
    /// Save a resumable checkpoint at least this often.
    pub checkpoint_every: Duration,
    pub hub: HubOptions,
}

/// Plain statistics of a run in progress.
#[derive(Clone, Debug, Serialize)]
pub struct TrainProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: u64,
    pub total_steps: u64,
    pub loss: f32,
    pub lr: f64,
    /// exp(t), the logit scale.
    pub temperature: f32,
    /// Training samples per second of time spent in training steps (data
    /// loading included; validation and checkpoints excluded).
    pub samples_per_second: f64,
    pub elapsed_seconds: f64,
    /// Of `elapsed_seconds`, the time spent validating, exporting and
    /// writing checkpoints.
    pub overhead_seconds: f64,
    /// Set after each epoch's validation.
    pub validation: Option<Validation>,
}

/// Validation after an epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    pub epoch: usize,
    pub loss: f32,
    pub image_to_text_r1: f32,
    pub text_to_image_r1: f32,
    pub image_to_text_r5: f32,
    pub text_to_image_r5: f32,
    pub samples: usize,
}

/// The settings that define a run: a checkpoint resumes only the same run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunKey {
    data: String,
    val: Option<String>,
    val_percent: f64,
    start: String,
    config: String,
    epochs: usize,
    batch: usize,
    lr: f64,
    warmup: Option<u64>,
    weight_decay: f64,
    seed: u64,
    freeze: Freeze,
    #[serde(default = "softmax")]
    loss: Objective,
    templates: Vec<String>,
}

/// Checkpoints from before the sigmoid loss trained with softmax.
fn softmax() -> Objective {
    Objective::Softmax
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    run: RunKey,
    /// Steps completed.
    step: u64,
    history: Vec<Validation>,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub train_samples: usize,
    pub val_samples: usize,
    pub skipped: Vec<Problem>,
    pub steps: u64,
    pub parameters: usize,
    pub trainable_parameters: usize,
    /// As in [`TrainProgress::samples_per_second`].
    pub samples_per_second: f64,
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Time spent validating, exporting and writing checkpoints.
    pub overhead_seconds: f64,
    pub history: Vec<Validation>,
}

/// Serves trainable weights as `Var`s and frozen ones as plain tensors.
struct Weights {
    vars: HashMap<String, Var>,
    frozen: HashMap<String, Tensor>,
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, DType::F32, &Device::Cpu)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: the config wants {s:?}, the weights have {:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        match (self.vars.get(name), self.frozen.get(name)) {
            (Some(v), _) => Ok(v.as_tensor().clone()),
            (None, Some(t)) => Ok(t.clone()),
            _ => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.frozen.contains_key(name)
    }
}

/// A model whose unfrozen weights are `Var`s.
pub struct TrainableModel {
    pub model: ClipModel,
    /// (name, var), the weights that learn.
    pub trainable: Vec<(String, Var)>,
    /// The weights that stay fixed.
    pub frozen: HashMap<String, Tensor>,
}

/// The objective a run uses: the one asked for, else the family's.
pub fn objective(config: &ClipConfig, asked: Option<Objective>) -> Objective {
    asked.unwrap_or(match config.family {
        Family::Clip => Objective::Softmax,
        Family::Siglip => Objective::Sigmoid,
    })
}

/// Builds a model for training from a checkpoint's tensors (Hugging Face names).
///
/// A missing temperature is added (a sigmoid run of a model without a bias,
/// a CLIP architecture, gets `logit_bias` too, initialised as SigLIP's paper
/// says); SigLIP stores both as one-element vectors, CLIP its temperature as a scalar.
pub fn build_model(
    config: &ClipConfig,
    tensors: HashMap<String, Tensor>,
    freeze: Freeze,
    objective: Objective,
) -> Result<TrainableModel> {
    let mut weights = Weights {
        vars: HashMap::new(),
        frozen: HashMap::new(),
    };
    for (name, t) in tensors {
        // Batch normalisation's running statistics are state, not weights:
        // the model updates them itself.
        let buffer = name.ends_with(".running_mean") || name.ends_with(".running_var");
        if freeze.frozen(&name) || buffer {
            weights.frozen.insert(name, t);
        } else {
            weights.vars.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    let shape: &[usize] = if config.family == Family::Siglip {
        &[1]
    } else {
        &[]
    };
    let fresh =
        |value: f64| Var::from_tensor(&Tensor::new(value as f32, &Device::Cpu)?.reshape(shape)?);
    let sigmoid = objective == Objective::Sigmoid;
    if !weights.contains_tensor("logit_scale") {
        let init = if sigmoid {
            SIGMOID_INIT_LOG_SCALE
        } else {
            config.logit_scale_init_value
        };
        weights.vars.insert("logit_scale".into(), fresh(init)?);
    }
    if (sigmoid || config.family == Family::Siglip) && !weights.contains_tensor("logit_bias") {
        weights
            .vars
            .insert("logit_bias".into(), fresh(SIGMOID_INIT_BIAS)?);
    }
    let trainable: Vec<(String, Var)> = weights
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let frozen = weights.frozen.clone();
    let vb = VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu);
    let model = ClipModel::new(vb, config)?;
    Ok(TrainableModel {
        model,
        trainable,
        frozen,
    })
}

/// The CLIP BPE tokenizer shipped with clipdex (OpenAI's vocabulary), for
/// models trained from scratch.
pub fn builtin_tokenizer_json() -> Vec<u8> {
    crate::model::tokenizer::builtin_clip_tokenizer_json()
}

/// The base model's parts.
struct Base {
    config: ClipConfig,
    tensors: HashMap<String, Tensor>,
    /// Tokenizer files to copy into the output: (name, bytes), the
    /// checkpoint's `tokenizer_config.json` among them when it has one.
    tokenizer_files: Vec<(String, Vec<u8>)>,
    preprocessor: Preprocessor,
}

fn load_base(start: &Start, seed: u64, hub: &HubOptions) -> Result<Base> {
    let device = Device::Cpu;
    match start {
        Start::Scratch(config) => Ok(Base {
            config: config.clone(),
            tensors: init::init_weights(config, seed, &device)?,
            tokenizer_files: vec![("tokenizer.json".into(), builtin_tokenizer_json())],
            preprocessor: Preprocessor::clip_default(config.vision_config.image_size),
        }),
        Start::Checkpoint(source) => {
            let files = checkpoint::resolve(source, hub)?;
            let read = |p: &Path| std::fs::read(p).map_err(io(p));
            // An open_clip checkpoint becomes the same model in Hugging Face
            // names (its config says which tokenizer and towers it has).
            let model_config = files.read_config()?;
            let tensors = files.read_tensors(&model_config.config)?;
            let tensors = tensors
                .into_iter()
                .filter(|(k, _)| !k.ends_with("position_ids"))
                .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            let mut tokenizer_files = match &files.tokenizer {
                TokenizerFiles::Json(p) => vec![("tokenizer.json".into(), read(p)?)],
                TokenizerFiles::SentencePiece(p) => vec![("spiece.model".into(), read(p)?)],
                TokenizerFiles::Merges(p) => vec![("merges.txt".into(), read(p)?)],
                TokenizerFiles::OpenAiBuiltin => {
                    vec![("tokenizer.json".into(), builtin_tokenizer_json())]
                }
                TokenizerFiles::VocabMerges { vocab, merges } => {
                    vec![
                        ("vocab.json".into(), read(vocab)?),
                        ("merges.txt".into(), read(merges)?),
                    ]
                }
            };
            if let Some(p) = &files.tokenizer_config {
                tokenizer_files.push(("tokenizer_config.json".into(), read(p)?));
            }
            let (preprocessor, _) = files.read_preprocessor(&model_config)?;
            Ok(Base {
                config: model_config.config,
                tensors,
                tokenizer_files,
                preprocessor,
            })
        }
    }
}

/// Writes the tokenizer files into `dir` (the output checkpoint) and loads them from there.
fn tokenizer_from(
    files: &[(String, Vec<u8>)],
    dir: &Path,
    config: &ClipConfig,
) -> Result<TextTokenizer> {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).map_err(io(dir))?;
    }
    let has = |name: &str| files.iter().any(|(n, _)| n == name);
    let kind = if has("tokenizer.json") {
        TokenizerFiles::Json(dir.join("tokenizer.json"))
    } else if has("spiece.model") {
        TokenizerFiles::SentencePiece(dir.join("spiece.model"))
    } else if !has("vocab.json") {
        TokenizerFiles::Merges(dir.join("merges.txt"))
    } else {
        TokenizerFiles::VocabMerges {
            vocab: dir.join("vocab.json"),
            merges: dir.join("merges.txt"),
        }
    };
    let settings = match files.iter().find(|(n, _)| n == "tokenizer_config.json") {
        Some((_, bytes)) => TokenizerSettings::from_json(&String::from_utf8_lossy(bytes))?,
        None => TokenizerSettings::default(),
    };
    Ok(TextTokenizer::for_config(config, &kind, &settings)?)
}

/// A scalar of a one-element tensor (SigLIP's scale and bias are vectors of one).
fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.get(0)?.to_scalar::<f32>()?)
}

/// Tokenised captions, padded per batch.
fn text_batch(tokens: &[Vec<u32>], tokenizer: &TextTokenizer) -> Result<(Tensor, Vec<usize>)> {
    let len = tokens.iter().map(Vec::len).max().unwrap_or(2);
    let mut ids = Vec::with_capacity(tokens.len() * len);
    let mut pool = Vec::with_capacity(tokens.len());
    for t in tokens {
        ids.extend_from_slice(t);
        ids.extend(std::iter::repeat_n(tokenizer.pad_id(), len - t.len()));
        pool.push(tokenizer.pool_position(t));
    }
    Ok((
        Tensor::from_vec(ids, (tokens.len(), len), &Device::Cpu)?,
        pool,
    ))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::common::fs::write_synced(path, bytes).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The training and validation pairs, their pictures and their tokens.
struct Prepared {
    train_samples: Vec<Sample>,
    val_samples: Vec<Sample>,
    train_images: ImageSet,
    val_images: ImageSet,
    train_tokens: Vec<Vec<u32>>,
    val_tokens: Vec<Vec<u32>>,
    /// Items left out, with the reason.
    problems: Vec<data::Problem>,
}

/// Reads the data, splits it (or reads the validation set), decodes the
/// pictures once, tokenizes the captions, and writes the split it used.
fn prepare_data(
    opts: &TrainOptions,
    preprocessor: &Preprocessor,
    tokenizer: &TextTokenizer,
) -> Result<Prepared> {
    let load = |p: &Path| {
        data::load(p, &opts.templates)
            .map_err(|e| Error::Data(format!("cannot read {}: {e}", p.display())))
    };
    let Dataset {
        samples,
        mut problems,
    } = load(&opts.data)?;
    let (train_samples, val_samples) = match &opts.val {
        Some(v) => {
            let d = load(v)?;
            problems.extend(d.problems);
            (samples, d.samples)
        }
        None => {
            // Image paths are the data file's folder (or the data folder) joined
            // with what the data names; the split hashes what the data names.
            let base = if opts.data.is_dir() {
                opts.data.as_path()
            } else {
                opts.data.parent().unwrap_or(Path::new(""))
            };
            data::split(samples, opts.val_percent, base)
        }
    };
    let (train_images, kept, bad) = ImageSet::prepare(&train_samples, preprocessor);
    problems.extend(bad);
    let train_samples: Vec<Sample> = kept.iter().map(|&i| train_samples[i].clone()).collect();
    let (val_images, kept, bad) = ImageSet::prepare(&val_samples, preprocessor);
    problems.extend(bad);
    let val_samples: Vec<Sample> = kept.iter().map(|&i| val_samples[i].clone()).collect();
    for p in &problems {
        tracing::warn!(item = %p.item, reason = %p.reason, "skipping training item");
    }
    if train_samples.len() < opts.batch {
        return Err(Error::Data(format!(
            "{} usable training pairs, fewer than one batch of {}",
            train_samples.len(),
            opts.batch
        )));
    }
    data::write_jsonl(&opts.out.join("train.jsonl"), &train_samples).map_err(io(&opts.out))?;
    data::write_jsonl(&opts.out.join("val.jsonl"), &val_samples).map_err(io(&opts.out))?;
    let tokens = |s: &[Sample]| {
        s.iter()
            .map(|x| tokenizer.encode(&x.caption))
            .collect::<crate::model::Result<Vec<_>>>()
    };
    let (train_tokens, val_tokens) = (tokens(&train_samples)?, tokens(&val_samples)?);
    Ok(Prepared {
        train_samples,
        val_samples,
        train_images,
        val_images,
        train_tokens,
        val_tokens,
        problems,
    })
}

/// What makes a run the same run: a checkpoint of another is not resumed.
fn run_key(opts: &TrainOptions, config: &ClipConfig, loss: Objective) -> RunKey {
    RunKey {
        data: std::fs::canonicalize(&opts.data)
            .unwrap_or(opts.data.clone())
            .display()
            .to_string(),
        val: opts.val.as_ref().map(|v| {
            std::fs::canonicalize(v)
                .unwrap_or(v.clone())
                .display()
                .to_string()
        }),
        val_percent: opts.val_percent,
        start: match &opts.start {
            Start::Checkpoint(s) => s.id(),
            Start::Scratch(_) => "scratch".into(),
        },
        config: config.to_json(),
        epochs: opts.epochs,
        batch: opts.batch,
        lr: opts.lr,
        warmup: opts.warmup,
        weight_decay: opts.weight_decay,
        seed: opts.seed,
        freeze: opts.freeze,
        loss,
        templates: opts.templates.clone(),
    }
}

/// Restores weights (and the model's state, `vars`), optimiser state, step
/// and history from the run's checkpoint, if there is one; `(0, [])` for a
/// fresh run.
fn resume(
    opts: &TrainOptions,
    ckpt: &Path,
    run: &RunKey,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
) -> Result<(u64, Vec<Validation>)> {
    if !ckpt.join("state.json").is_file() {
        return Ok((0, Vec::new()));
    }
    let state: CheckpointState =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).map_err(io(ckpt))?)
            .map_err(|e| Error::Resume(format!("checkpoint/state.json is unreadable: {e}")))?;
    if &state.run != run {
        return Err(Error::Resume(format!(
            "{} holds a checkpoint of another run (other data or settings); use another --out, or delete {}",
            opts.out.display(),
            ckpt.display()
        )));
    }
    let saved = candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu)?;
    for (name, var) in vars {
        let t = saved
            .get(name)
            .ok_or_else(|| Error::Resume(format!("checkpoint lacks {name}")))?;
        var.set(t)?;
    }
    optimizer.load(&ckpt.join("optimizer.safetensors"))?;
    tracing::info!(step = state.step, "resuming");
    Ok((state.step, state.history))
}

/// Saves weights, optimiser state and progress as `checkpoint/`, replaced
/// whole: a kill at any moment leaves the old checkpoint or the new one.
fn save_checkpoint(
    out: &Path,
    vars: &[(String, Var)],
    optimizer: &AdamW,
    state: &CheckpointState,
) -> Result<()> {
    let (tmp, ckpt) = (out.join("checkpoint.tmp"), out.join("checkpoint"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))?;
    optimizer.save(&tmp.join("optimizer.safetensors"))?;
    write_synced(
        &tmp.join("state.json"),
        &serde_json::to_vec_pretty(state).expect("state serialises"),
    )?;
    for f in ["model.safetensors", "optimizer.safetensors"] {
        std::fs::File::open(tmp.join(f))
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
    }
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if ckpt.exists() {
        std::fs::rename(&ckpt, &old).map_err(io(&ckpt))?;
    }
    std::fs::rename(&tmp, &ckpt).map_err(io(&ckpt))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes the model as a Hugging Face checkpoint in `out`.
fn export(
    out: &Path,
    config: &ClipConfig,
    preprocessor: &Preprocessor,
    frozen: &HashMap<String, Tensor>,
    vars: &[(String, Var)],
    history: &[Validation],
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = frozen.clone();
    for (k, v) in vars {
        tensors.insert(k.clone(), v.as_tensor().detach());
    }
    // CLIPModel has no bias: a CLIP architecture trained with the sigmoid
    // loss embeds (and ranks) without it.
    if config.family == Family::Clip {
        tensors.remove("logit_bias");
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    write_synced(&out.join("config.json"), config.to_json().as_bytes())?;
    write_synced(
        &out.join("preprocessor_config.json"),
        preprocessor.to_json().as_bytes(),
    )?;
    // A checkpoint's own tokenizer_config.json was copied with its tokenizer;
    // open_clip's tokenizers are named by the config and take none.
    if !out.join("tokenizer_config.json").is_file() && config.tokenizer.is_none() {
        let tok_config = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": config.text_config.max_position_embeddings,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"
        });
        write_synced(
            &out.join("tokenizer_config.json"),
            tok_config.to_string().as_bytes(),
        )?;
    }
    write_synced(
        &out.join("training.json"),
        &serde_json::to_vec_pretty(&history).expect("history serialises"),
    )?;
    Ok(())
}

/// Trains; `callback` receives statistics after every step.
pub fn train(
    opts: &TrainOptions,
    callback: &mut dyn FnMut(&TrainProgress),
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let base = load_base(&opts.start, opts.seed, &opts.hub)?;
    let tokenizer = tokenizer_from(&base.tokenizer_files, &opts.out, &base.config)?;
    let data = prepare_data(opts, &base.preprocessor, &tokenizer)?;
    let mut session = Session::new(opts, base, tokenizer, data.train_samples.len())?;
    let resumed_at = session.progress.step;
    session.run_steps(&data, callback, stop)?;
    if session.schedule.total_steps == resumed_at {
        session.export()?;
    }
    Ok(TrainSummary {
        out: opts.out.clone(),
        train_samples: data.train_samples.len(),
        val_samples: data.val_samples.len(),
        skipped: data.problems,
        steps: session.schedule.total_steps,
        parameters: session.optimizer.num_params()
            + session
                .frozen
                .values()
                .map(|t| t.elem_count())
                .sum::<usize>(),
        trainable_parameters: session.optimizer.num_params(),
        samples_per_second: session.progress.samples_per_second,
        seconds: started.elapsed().as_secs_f64(),
        overhead_seconds: session.progress.overhead_seconds,
        history: session.history,
    })
}

/// How many steps a run takes, and its learning-rate warm-up.
struct Schedule {
    steps_per_epoch: u64,
    total_steps: u64,
    warmup: u64,
}

impl Schedule {
    fn new(opts: &TrainOptions, train_samples: usize) -> Self {
        let steps_per_epoch = (train_samples / opts.batch) as u64;
        let total_steps = steps_per_epoch * opts.epochs as u64;
        Self {
            steps_per_epoch,
            total_steps,
            warmup: opts.warmup.unwrap_or(total_steps / 20),
        }
    }

    /// The epoch (from 0) that step `s` (from 0) belongs to.
    fn epoch(&self, s: u64) -> usize {
        (s / self.steps_per_epoch.max(1)) as usize
    }
}

/// A run between two steps: the model, its optimiser, and what it reports.
struct Session<'a> {
    opts: &'a TrainOptions,
    config: ClipConfig,
    preprocessor: Preprocessor,
    tokenizer: TextTokenizer,
    objective: Objective,
    model: ClipModel,
    /// The temperature, log-parameterised, and the sigmoid loss's bias.
    log_scale: Var,
    bias: Option<Var>,
    optimizer: AdamW,
    /// What a checkpoint holds: the weights that learn and the model's own state.
    saved: Vec<(String, Var)>,
    frozen: HashMap<String, Tensor>,
    run: RunKey,
    schedule: Schedule,
    history: Vec<Validation>,
    /// What the callback last received; `step` is the steps completed.
    progress: TrainProgress,
}

impl<'a> Session<'a> {
    /// Builds the model from the base, and restores the run's checkpoint if
    /// there is one.
    fn new(
        opts: &'a TrainOptions,
        base: Base,
        tokenizer: TextTokenizer,
        train_samples: usize,
    ) -> Result<Self> {
        let Base {
            config,
            tensors,
            preprocessor,
            ..
        } = base;
        let objective = objective(&config, opts.loss);
        let trained = build_model(&config, tensors, opts.freeze, objective)?;
        let find = |name: &str| {
            trained
                .trainable
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let log_scale = find("logit_scale")
            .ok_or_else(|| Error::Data("the temperature must be trainable".into()))?;
        let bias = find("logit_bias");
        if objective == Objective::Sigmoid && bias.is_none() {
            return Err(Error::Data(
                "the sigmoid loss's bias must be trainable".into(),
            ));
        }
        let mut optimizer = AdamW::new(
            trained.trainable.clone(),
            AdamWConfig {
                weight_decay: opts.weight_decay,
                ..Default::default()
            },
        )?;
        let saved: Vec<(String, Var)> = trained
            .trainable
            .into_iter()
            .chain(trained.model.buffers())
            .collect();
        let schedule = Schedule::new(opts, train_samples);
        let run = run_key(opts, &config, objective);
        let (step, history) = resume(
            opts,
            &opts.out.join("checkpoint"),
            &run,
            &saved,
            &mut optimizer,
        )?;
        let progress = TrainProgress {
            epoch: schedule.epoch(step),
            epochs: opts.epochs,
            step,
            total_steps: schedule.total_steps,
            loss: f32::NAN,
            lr: 0.0,
            temperature: scalar(&log_scale.as_tensor().exp()?)?,
            samples_per_second: 0.0,
            elapsed_seconds: 0.0,
            overhead_seconds: 0.0,
            validation: history.last().cloned(),
        };
        Ok(Self {
            opts,
            config,
            preprocessor,
            tokenizer,
            objective,
            model: trained.model,
            log_scale,
            bias,
            optimizer,
            saved,
            frozen: trained.frozen,
            run,
            schedule,
            history,
            progress,
        })
    }

    /// The steps left: batches are built on another thread, one step ahead;
    /// each epoch ends with validation and an export; checkpoints are saved
    /// at epoch ends, every `checkpoint_every`, at the end and on `stop`.
    fn run_steps(
        &mut self,
        data: &Prepared,
        callback: &mut dyn FnMut(&TrainProgress),
        stop: &AtomicBool,
    ) -> Result<()> {
        let first_step = self.progress.step;
        let mut log = StepLog::open(&self.opts.out.join("steps.jsonl"), first_step)?;
        let loop_start = Instant::now();
        let mut last_checkpoint = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = crossbeam_channel::bounded::<Batch>(2);
            let producer = BatchProducer {
                images: &data.train_images,
                image_size: self.preprocessor.image_size(),
                batch: self.opts.batch,
                seed: self.opts.seed,
                steps_per_epoch: self.schedule.steps_per_epoch,
            };
            let total = self.schedule.total_steps;
            scope.spawn(move || producer.send(first_step..total, &tx));
            for batch in rx.iter() {
                let s = batch.step;
                let (loss, lr) = self.train_step(batch, &data.train_tokens, s == first_step)?;
                let done = s + 1;
                log.append(done, loss, lr)?;
                let p = &mut self.progress;
                p.step = done;
                p.epoch = self.schedule.epoch(s);
                p.loss = loss;
                p.lr = lr;
                p.temperature = scalar(&self.log_scale.as_tensor().exp()?)?;
                p.elapsed_seconds = loop_start.elapsed().as_secs_f64();
                p.samples_per_second = ((done - first_step) * self.opts.batch as u64) as f64
                    / (p.elapsed_seconds - p.overhead_seconds).max(1e-9);
                let overhead_start = Instant::now();
                let epoch_end = done % self.schedule.steps_per_epoch == 0;
                if epoch_end {
                    self.end_epoch(&data.val_images, &data.val_tokens)?;
                }
                callback(&self.progress);
                if epoch_end
                    || last_checkpoint.elapsed() >= self.opts.checkpoint_every
                    || done == total
                    || stop.load(Ordering::Relaxed)
                {
                    self.checkpoint()?;
                    last_checkpoint = Instant::now();
                }
                self.progress.overhead_seconds += overhead_start.elapsed().as_secs_f64();
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Stopped);
                }
            }
            Ok(())
        })
    }

    /// One optimisation step (step `batch.step`, from 0): the loss, its
    /// gradients, the update, and CLIP's temperature clip. Returns the loss
    /// before the update and the learning rate used.
    fn train_step(&mut self, batch: Batch, tokens: &[Vec<u32>], first: bool) -> Result<(f32, f64)> {
        let s = self.preprocessor.image_size();
        let pixels = Tensor::from_vec(batch.pixels, (batch.samples.len(), 3, s, s), &Device::Cpu)?;
        let toks: Vec<Vec<u32>> = batch.samples.iter().map(|&i| tokens[i].clone()).collect();
        let (ids, pool) = text_batch(&toks, &self.tokenizer)?;
        let image_features = self.model.get_image_features(&pixels)?;
        let text_features = self.model.get_text_features(&ids, &pool)?;
        let (loss, _) = self.objective.loss(
            &image_features,
            &text_features,
            self.log_scale.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
        )?;
        let grads = loss.backward()?;
        if first {
            let missing = self.optimizer.missing_gradients(&grads);
            if !missing.is_empty() {
                return Err(Error::Data(format!(
                    "no gradient reaches {}",
                    missing.join(", ")
                )));
            }
        }
        let lr = learning_rate(
            batch.step,
            self.opts.lr,
            self.schedule.warmup,
            self.schedule.total_steps,
        );
        self.optimizer.step(&grads, lr)?;
        // CLIP clips the temperature so that exp(t) stays at most 100;
        // SigLIP leaves it free.
        if self.objective == Objective::Softmax {
            let t = self.log_scale.as_tensor().clamp(0f32, 100f32.ln())?;
            self.log_scale.set(&t)?;
        }
        Ok((loss.to_scalar::<f32>()?, lr))
    }

    /// Validates on the held-out pairs and exports the model as it is now.
    fn end_epoch(&mut self, images: &ImageSet, tokens: &[Vec<u32>]) -> Result<()> {
        let scoring = Scoring {
            objective: self.objective,
            log_scale: self.log_scale.as_tensor(),
            bias: self.bias.as_ref().map(Var::as_tensor),
        };
        // Batch normalisation on its running statistics, as the exported model runs.
        self.model.set_training(false);
        let validation = validate(
            &self.model,
            &scoring,
            images,
            tokens,
            self.opts.batch,
            &self.tokenizer,
            self.progress.epoch + 1,
        );
        self.model.set_training(true);
        if let Some(v) = validation? {
            self.history.push(v.clone());
            self.progress.validation = Some(v);
        }
        self.export()
    }

    fn checkpoint(&self) -> Result<()> {
        let state = CheckpointState {
            run: self.run.clone(),
            step: self.progress.step,
            history: self.history.clone(),
        };
        save_checkpoint(&self.opts.out, &self.saved, &self.optimizer, &state)
    }

    fn export(&self) -> Result<()> {
        export(
            &self.opts.out,
            &self.config,
            &self.preprocessor,
            &self.frozen,
            &self.saved,
            &self.history,
        )
    }
}

/// One step's training pictures (augmented, channels first) and the
/// indexes of its samples.
struct Batch {
    step: u64,
    pixels: Vec<f32>,
    samples: Vec<usize>,
}

/// Builds the batches of a run: the order of each epoch and every
/// augmentation follow from the seed, the epoch and the sample alone.
struct BatchProducer<'a> {
    images: &'a ImageSet,
    image_size: usize,
    batch: usize,
    seed: u64,
    steps_per_epoch: u64,
}

impl BatchProducer<'_> {
    /// Sends the batches of `steps` until the receiver hangs up.
    fn send(&self, steps: std::ops::Range<u64>, tx: &crossbeam_channel::Sender<Batch>) {
        use rayon::prelude::*;
        let plane = 3 * self.image_size * self.image_size;
        for step in steps {
            let epoch = (step / self.steps_per_epoch) as usize;
            let order = data::epoch_order(self.images.len(), self.seed, epoch);
            let at = ((step % self.steps_per_epoch) as usize) * self.batch;
            let samples = order[at..at + self.batch].to_vec();
            let mut pixels = vec![0f32; self.batch * plane];
            pixels
                .par_chunks_mut(plane)
                .zip(samples.par_iter())
                .for_each(|(out, &i)| {
                    let mut rng = data::sample_rng(self.seed, epoch, i);
                    self.images.augmented(i, &mut rng, out);
                });
            if tx
                .send(Batch {
                    step,
                    pixels,
                    samples,
                })
                .is_err()
            {
                break;
            }
        }
    }
}

/// `steps.jsonl`, one line per step: the loss curve, and what a resumed run
/// is checked against.
struct StepLog {
    path: PathBuf,
    file: std::fs::File,
}

impl StepLog {
    /// Opens the log for appending after step `from`, dropping what a killed
    /// run wrote past it.
    fn open(path: &Path, from: u64) -> Result<Self> {
        trim_steps_log(path, from)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn append(&mut self, step: u64, loss: f32, lr: f64) -> Result<()> {
        use std::io::Write;
        // One write per line: a kill leaves whole lines or a torn last one,
        // never a line split across two runs.
        let mut line = serde_json::json!({"step": step, "loss": loss, "lr": lr}).to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io(&self.path))
    }
}

/// What turns features into a loss: the objective, its temperature and bias.
struct Scoring<'a> {
    objective: Objective,
    log_scale: &'a Tensor,
    bias: Option<&'a Tensor>,
}

/// Validation loss and retrieval recall on (at most 2,000) held-out pairs.
fn validate(
    model: &ClipModel,
    scoring: &Scoring,
    images: &ImageSet,
    tokens: &[Vec<u32>],
    batch: usize,
    tokenizer: &TextTokenizer,
    epoch: usize,
) -> Result<Option<Validation>> {
    let n = images.len().min(2000);
    if n < 2 {
        return Ok(None);
    }
    let s = images.preprocessor.image_size();
    let plane = 3 * s * s;
    let mut image_features = Vec::new();
    let mut text_features = Vec::new();
    let mut losses = Vec::new();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let mut pixels = vec![0f32; (end - start) * plane];
        for (k, i) in (start..end).enumerate() {
            images.centered(i, &mut pixels[k * plane..(k + 1) * plane]);
        }
        let pixels = Tensor::from_vec(pixels, (end - start, 3, s, s), &Device::Cpu)?;
        let (ids, pool) = text_batch(&tokens[start..end], tokenizer)?;
        let i = model.get_image_features(&pixels)?.detach();
        let t = model.get_text_features(&ids, &pool)?.detach();
        if end - start > 1 {
            let bias = scoring.bias.map(Tensor::detach);
            let loss = scoring
                .objective
                .loss(&i, &t, &scoring.log_scale.detach(), bias.as_ref())?
                .0;
            losses.push(loss.to_scalar::<f32>()?);
        }
        image_features.push(crate::model::normalize(&i)?);
        text_features.push(crate::model::normalize(&t)?);
    }
    let i = Tensor::cat(&image_features, 0)?;
    let t = Tensor::cat(&text_features, 0)?;
    let sim = i.matmul(&t.t()?)?.to_vec2::<f32>()?;
    let pairs: Vec<usize> = (0..n).collect();
    let r = metrics::retrieval_from_similarity(&sim, &pairs);
    Ok(Some(Validation {
        epoch,
        loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
        image_to_text_r1: r.image_to_text.r1,
        text_to_image_r1: r.text_to_image.r1,
        image_to_text_r5: r.image_to_text.r5,
        text_to_image_r5: r.text_to_image.r5,
        samples: n,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_keeps_whole_lines_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n{\"step\":3,\"loss\":1.2}\n{\"st").unwrap();
        trim_steps_log(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n"
        );
        // A log already in order is left alone; a missing one is fine.
        trim_steps_log(&path, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        trim_steps_log(&dir.path().join("none.jsonl"), 0).unwrap();
    }
}
