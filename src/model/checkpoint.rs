//! Finding a checkpoint's files: a local folder in Hugging Face layout, or a
//! hub repository fetched through hf-hub's standard cache.
//!
//! A checkpoint is `config.json`, weights (`model.safetensors`, else
//! `pytorch_model.bin`), a tokenizer (`tokenizer.json`, else `spiece.model`,
//! else `vocab.json` + `merges.txt`) and optionally `tokenizer_config.json`
//! and `preprocessor_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::open_clip::{self, OpenClipConfig};
use super::{ClipConfig, Error, Preprocessor, Result};

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

/// Where a model comes from, as the user named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder.
    Dir(PathBuf),
    /// A hub repository id (`owner/name`), at an optional revision (`owner/name@rev`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// Reads a `--model` argument: an existing folder, else a hub id.
    pub fn parse(arg: &str) -> Result<Self> {
        // open_clip writes hub ids as `hf-hub:owner/name`.
        let arg = arg.strip_prefix("hf-hub:").unwrap_or(arg);
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if path.exists() {
            return Err(Error::Checkpoint(format!(
                "{arg} is a file; --model takes a checkpoint folder or a hub id such as {DEFAULT_MODEL}"
            )));
        }
        let (repo, revision) = match arg.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
            _ => (arg, None),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match repo.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) && !arg.starts_with('.') => {
                Ok(Self::Hub {
                    repo: repo.to_string(),
                    revision,
                })
            }
            _ => Err(Error::Checkpoint(format!(
                "no folder named {arg}, and it is not a hub id (owner/name such as {DEFAULT_MODEL})"
            ))),
        }
    }

    /// A stable name for the model: the hub id, or the folder's canonical path.
    pub fn id(&self) -> String {
        match self {
            Self::Dir(dir) => std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            Self::Hub {
                repo,
                revision: Some(rev),
            } => format!("{repo}@{rev}"),
            Self::Hub {
                repo,
                revision: None,
            } => repo.clone(),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Hub { .. } => write!(f, "{}", self.id()),
        }
    }
}

/// The tokenizer files a checkpoint has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerFiles {
    Json(PathBuf),
    /// BPE merges alone (open_clip builds its vocabulary from them).
    Merges(PathBuf),
    /// OpenAI's BPE as clipdex ships it (`model/clip_tokenizer.json.gz`):
    /// open_clip checkpoints that bring no tokenizer use it, as open_clip
    /// uses the copy in its package.
    OpenAiBuiltin,
    /// A SentencePiece model (SigLIP).
    SentencePiece(PathBuf),
    VocabMerges {
        vocab: PathBuf,
        merges: PathBuf,
    },
}

/// Weights, in the formats clipdex reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsFile {
    Safetensors(PathBuf),
    Pickle(PathBuf),
}

/// How a checkpoint's files are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// transformers': `config.json`, `model.safetensors`, tokenizer files.
    HuggingFace,
    /// open_clip's: `open_clip_config.json`, `open_clip_model.safetensors`;
    /// the tokenizer is OpenAI's BPE unless the folder has merges.
    OpenClip,
}

/// Local paths of every file a model needs.
#[derive(Clone, Debug)]
pub struct CheckpointFiles {
    pub layout: Layout,
    /// `config.json`, or `open_clip_config.json`.
    pub config: PathBuf,
    pub weights: WeightsFile,
    pub tokenizer: TokenizerFiles,
    pub tokenizer_config: Option<PathBuf>,
    pub preprocessor: Option<PathBuf>,
    /// open_clip with a Hugging Face text tower: that model's files.
    pub hf_text: Option<HfTextFiles>,
}

/// The `config.json` of the text model an open_clip checkpoint names
/// (`hf_model_name`) and the `tokenizer.json` of its tokenizer (`hf_tokenizer_name`).
#[derive(Clone, Debug)]
pub struct HfTextFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
}

/// What a checkpoint's configuration says.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub config: ClipConfig,
    /// open_clip's `preprocess_cfg`, read with the model's config, and its text.
    open_clip_preprocess: Option<(Preprocessor, String)>,
}

impl WeightsFile {
    /// Every tensor of the file (safetensors or a PyTorch pickle), in memory.
    pub fn read_all(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            WeightsFile::Safetensors(path) => {
                super::tensor_file::TensorFile::open(path)?.read_all()
            }
            WeightsFile::Pickle(path) => Ok(candle_core::pickle::read_all(path)
                .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?
                .into_iter()
                .collect()),
        }
    }
}

impl CheckpointFiles {
    /// The architecture, from `config.json` or from open_clip's
    /// `open_clip_config.json` (and its text model's `config.json`).
    pub fn read_config(&self) -> Result<ModelConfig> {
        let text = read_text(&self.config)?;
        if self.layout == Layout::OpenClip {
            let hf_text = self
                .hf_text
                .as_ref()
                .map(|f| read_text(&f.config))
                .transpose()?;
            let o = OpenClipConfig::from_json(&text, hf_text.as_deref())?;
            return Ok(ModelConfig {
                config: o.config,
                open_clip_preprocess: Some((o.preprocess, o.preprocess_text)),
            });
        }
        Ok(ModelConfig {
            config: ClipConfig::from_json(&text)?,
            open_clip_preprocess: None,
        })
    }

    /// The preprocessing: `preprocessor_config.json` (the family's defaults
    /// without one) or open_clip's `preprocess_cfg`; and its text as written
    /// (empty for defaults), part of the model's fingerprint.
    pub fn read_preprocessor(&self, model: &ModelConfig) -> Result<(Preprocessor, String)> {
        if let Some(p) = &model.open_clip_preprocess {
            return Ok(p.clone());
        }
        let config = &model.config;
        let image_size = config.vision_config.image_size;
        Ok(match &self.preprocessor {
            Some(path) => {
                let text = read_text(path)?;
                (Preprocessor::from_json(&text, image_size)?, text)
            }
            None => (
                Preprocessor::default_for(config.family, image_size),
                String::new(),
            ),
        })
    }

    /// Every weight in memory, under the names the towers load (open_clip's
    /// renamed).
    pub fn read_tensors(&self, config: &ClipConfig) -> Result<HashMap<String, Tensor>> {
        let tensors = self.weights.read_all()?;
        match self.layout {
            Layout::HuggingFace => Ok(tensors),
            Layout::OpenClip => open_clip::remap(tensors, config),
        }
    }
}

/// A text file of a checkpoint.
pub(super) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// How to reach the hub.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Never touch the network; use only the local cache.
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// `HF_HUB_OFFLINE=1` (as the Python hub client reads it) forces offline mode.
    pub fn from_env(offline: bool, progress: bool) -> Self {
        let env = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        Self {
            offline: offline || env.unwrap_or(false),
            progress,
        }
    }
}

const MISSING_HINT: &str = "a checkpoint folder in Hugging Face layout needs config.json, model.safetensors (or \
                            pytorch_model.bin) and tokenizer.json (or spiece.model, or vocab.json and merges.txt); \
                            one in open_clip's layout open_clip_config.json and open_clip_model.safetensors (or \
                            open_clip_pytorch_model.bin); pass it with --model <DIR>";

/// Resolves a source to local files, downloading from the hub when allowed.
pub fn resolve(source: &ModelSource, hub: &HubOptions) -> Result<CheckpointFiles> {
    match source {
        ModelSource::Dir(dir) => resolve_with(
            &source.to_string(),
            |name| {
                let path = dir.join(name);
                Ok(path.is_file().then_some(path))
            },
            hub,
        ),
        ModelSource::Hub { repo, revision } => {
            let cache = hub_cache();
            let hub_repo = match revision {
                Some(rev) => {
                    hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, rev.clone())
                }
                None => hf_hub::Repo::model(repo.clone()),
            };
            if hub.offline {
                let cached = cache.repo(hub_repo);
                return resolve_with(&source.to_string(), |name| Ok(cached.get(name)), hub).map_err(|e| match e {
                    Error::MissingFile { file, .. } => Error::MissingFile {
                        file,
                        location: format!("the hub cache ({}) for {source}", cache.path().display()),
                        hint: "offline mode (--offline or HF_HUB_OFFLINE=1) reads only the cache: run once online, \
                               or pass a local checkpoint folder with --model <DIR>"
                            .into(),
                    },
                    other => other,
                });
            }
            let api_repo = hub_api(hub)?.repo(hub_repo);
            resolve_with(
                &source.to_string(),
                |name| match api_repo.get(name) {
                    Ok(path) => Ok(Some(path)),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(Error::Download(format!(
                        "cannot fetch {name} of {source}: {e}; check the network, or use --offline with a cached \
                         model, or pass a local checkpoint folder with --model <DIR>"
                    ))),
                },
                hub,
            )
        }
    }
}

/// The hub client, on the standard cache, `HF_ENDPOINT` if set.
fn hub_api(hub: &HubOptions) -> Result<hf_hub::api::sync::Api> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hub_cache())
        .with_progress(hub.progress)
        .with_retries(2);
    let api = match std::env::var("HF_ENDPOINT") {
        Ok(endpoint) => api.with_endpoint(endpoint),
        Err(_) => api,
    };
    api.build()
        .map_err(|e| Error::Download(format!("cannot start the hub client: {e}")))
}

/// One file of a hub repository: from the cache, else (online) downloaded.
fn hub_file(repo: &str, name: &str, hub: &HubOptions) -> Result<Option<PathBuf>> {
    let model = || hf_hub::Repo::model(repo.to_string());
    if let Some(path) = hub_cache().repo(model()).get(name) {
        return Ok(Some(path));
    }
    if hub.offline {
        return Ok(None);
    }
    match hub_api(hub)?.repo(model()).get(name) {
        Ok(path) => Ok(Some(path)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(Error::Download(format!(
            "cannot fetch {name} of {repo}: {e}; check the network, or use --offline with a cached model"
        ))),
    }
}

/// Whether a hub repository's checkpoint is in the local cache (config and
/// weights), so that it loads offline.
pub fn is_cached(repo: &str) -> bool {
    let cached = hub_cache().repo(hf_hub::Repo::model(repo.to_string()));
    let has = |name: &str| cached.get(name).is_some();
    (has("config.json") && (has("model.safetensors") || has("pytorch_model.bin")))
        || (has("open_clip_config.json")
            && (has("open_clip_model.safetensors") || has("open_clip_pytorch_model.bin")))
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    }
}

fn is_not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    let text = e.to_string();
    text.contains("404") || text.contains("Not Found") || text.contains("EntryNotFound")
}

/// Picks the files of a checkpoint through `get`, which answers "this file's
/// local path", "no such file", or an error.
/// (Hub repositories of LAION's models have both layouts; the Hugging Face one is read.)
fn resolve_with(
    location: &str,
    get: impl Fn(&str) -> Result<Option<PathBuf>>,
    hub: &HubOptions,
) -> Result<CheckpointFiles> {
    let missing = |file: &str| Error::MissingFile {
        file: file.to_string(),
        location: location.to_string(),
        hint: MISSING_HINT.to_string(),
    };
    let config = match get("config.json")? {
        Some(path) => path,
        None => match get("open_clip_config.json")? {
            Some(config) => return resolve_open_clip(location, config, &get, hub),
            None => return Err(missing("config.json")),
        },
    };
    let weights = match get("model.safetensors")? {
        Some(path) => WeightsFile::Safetensors(path),
        None => WeightsFile::Pickle(
            get("pytorch_model.bin")?.ok_or_else(|| missing("model.safetensors"))?,
        ),
    };
    let tokenizer = match (get("tokenizer.json")?, get("spiece.model")?) {
        (Some(path), _) => TokenizerFiles::Json(path),
        (None, Some(path)) => TokenizerFiles::SentencePiece(path),
        (None, None) => match (get("vocab.json")?, get("merges.txt")?) {
            (Some(vocab), Some(merges)) => TokenizerFiles::VocabMerges { vocab, merges },
            // open_clip's tokenizer (a model fine-tuned from an open_clip checkpoint).
            (None, Some(merges)) => TokenizerFiles::Merges(merges),
            (Some(_), None) => return Err(missing("merges.txt")),
            (None, None) => return Err(missing("tokenizer.json")),
        },
    };
    let tokenizer_config = get("tokenizer_config.json")?;
    let preprocessor = get("preprocessor_config.json")?;
    Ok(CheckpointFiles {
        layout: Layout::HuggingFace,
        config,
        weights,
        tokenizer,
        tokenizer_config,
        preprocessor,
        hf_text: None,
    })
}

/// The files of an open_clip checkpoint.
fn resolve_open_clip(
    location: &str,
    config: PathBuf,
    get: &impl Fn(&str) -> Result<Option<PathBuf>>,
    hub: &HubOptions,
) -> Result<CheckpointFiles> {
    let hint = "an open_clip checkpoint needs open_clip_config.json and open_clip_model.safetensors (or \
                open_clip_pytorch_model.bin)";
    let weights = match get("open_clip_model.safetensors")? {
        Some(path) => WeightsFile::Safetensors(path),
        None => WeightsFile::Pickle(get("open_clip_pytorch_model.bin")?.ok_or_else(|| {
            Error::MissingFile {
                file: "open_clip_model.safetensors".into(),
                location: location.to_string(),
                hint: hint.into(),
            }
        })?),
    };
    let tokenizer = match (get("merges.txt")?, get("tokenizer.json")?) {
        (Some(path), _) => TokenizerFiles::Merges(path),
        (None, Some(path)) => TokenizerFiles::Json(path),
        // open_clip's own tokenizer file is OpenAI's BPE, which clipdex ships.
        (None, None) => TokenizerFiles::OpenAiBuiltin,
    };
    let hf_text = hf_text_files(location, &config, hub)?;
    // A Hugging Face text tower brings its own tokenizer.
    let tokenizer = match &hf_text {
        Some(files) => TokenizerFiles::Json(files.tokenizer.clone()),
        None => tokenizer,
    };
    Ok(CheckpointFiles {
        layout: Layout::OpenClip,
        config,
        weights,
        tokenizer,
        tokenizer_config: None,
        preprocessor: None,
        hf_text,
    })
}

/// The files of the Hugging Face text model an open_clip config names, if any.
fn hf_text_files(location: &str, config: &Path, hub: &HubOptions) -> Result<Option<HfTextFiles>> {
    let value: serde_json::Value = serde_json::from_str(&read_text(config)?)
        .map_err(|e| Error::Config(format!("open_clip_config.json of {location}: {e}")))?;
    let text_cfg = &value["model_cfg"]["text_cfg"];
    let Some(model) = text_cfg["hf_model_name"].as_str() else {
        return Ok(None);
    };
    let tokenizer = text_cfg["hf_tokenizer_name"].as_str().unwrap_or(model);
    let need = |repo: &str, name: &str| -> Result<PathBuf> {
        // A local folder wins over a hub id, as transformers' from_pretrained
        // has it (relative to the checkpoint's folder).
        let folder = config.parent().map(|p| p.join(repo)).filter(|p| p.is_dir());
        if let Some(folder) = folder {
            let path = folder.join(name);
            return match path.is_file() {
                true => Ok(path),
                false => Err(Error::MissingFile {
                    file: name.to_string(),
                    location: folder.display().to_string(),
                    hint: format!("the text tower of {location} is read from that folder"),
                }),
            };
        }
        let repo = repo.strip_prefix("hf-hub:").unwrap_or(repo);
        hub_file(repo, name, hub)?.ok_or_else(|| Error::MissingFile {
            file: name.to_string(),
            location: format!("the hub repository {repo} (the text tower {location} names)"),
            hint: if hub.offline {
                "offline mode reads only the hub cache: run once online".into()
            } else {
                "the repository has no such file".into()
            },
        })
    };
    Ok(Some(HfTextFiles {
        config: need(model, "config.json")?,
        tokenizer: need(tokenizer, "tokenizer.json")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_arguments() {
        assert_eq!(
            ModelSource::parse("openai/clip-vit-base-patch32").unwrap(),
            ModelSource::Hub {
                repo: "openai/clip-vit-base-patch32".into(),
                revision: None
            }
        );
        assert_eq!(
            ModelSource::parse("laion/CLIP-ViT-B-32-laion2B-s34B-b79K@main").unwrap(),
            ModelSource::Hub {
                repo: "laion/CLIP-ViT-B-32-laion2B-s34B-b79K".into(),
                revision: Some("main".into())
            }
        );
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(dir.to_str().unwrap()).unwrap(),
            ModelSource::Dir(dir.clone())
        );
        assert_eq!(
            ModelSource::parse("hf-hub:timm/ViT-B-16-SigLIP").unwrap(),
            ModelSource::Hub {
                repo: "timm/ViT-B-16-SigLIP".into(),
                revision: None
            }
        );
        for bad in [
            "no-such-folder",
            "./missing/model",
            "a/b/c",
            "/abs/missing",
            "hf-hub:",
        ] {
            assert!(
                matches!(ModelSource::parse(bad), Err(Error::Checkpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("clipdex-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = ModelSource::Dir(dir.clone());
        let err = resolve(&source, &HubOptions::default()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
        std::fs::write(dir.join("vocab.json"), "{}").unwrap();
        let err = resolve(&source, &HubOptions::default()).unwrap_err();
        assert!(err.to_string().contains("merges.txt"), "{err}");
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        let files = resolve(&source, &HubOptions::default()).unwrap();
        assert!(matches!(
            files.tokenizer,
            TokenizerFiles::VocabMerges { .. }
        ));
        assert!(files.preprocessor.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
