//! What the server holds: the search engine once it is ready, the start-up
//! state (loading the model, opening the index), and the one re-index job.
//! Start-up and re-indexing run on their own threads; handlers only read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use crate::indexer::{self, Index, Progress, RunOptions};
use crate::model::{Clip, HubOptions, ModelInfo, ModelSource};
use crate::search::Engine;
use crate::store::RunSummary;

/// Settings of a running server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub index: PathBuf,
    /// Library to index at start; `None` serves an existing index.
    pub library: Option<PathBuf>,
    /// Model to use; `None` takes the index's.
    pub model: Option<String>,
    pub hub: HubOptions,
    pub run: RunOptions,
    /// Required on every request when set.
    pub token: Option<String>,
    /// Origin allowed by CORS, if any.
    pub cors: Option<String>,
    /// Largest accepted image upload, bytes.
    pub max_upload: usize,
    /// Start a re-index once ready (implied by `library`).
    pub reindex_on_start: bool,
    /// Host names accepted besides loopback ones (`--allow-host`), lower-case.
    pub allow_hosts: Vec<String>,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Decode memory all image uploads in flight may hold together, bytes.
    pub decode_budget: u64,
}

impl ServerConfig {
    /// Defaults for serving an existing index.
    pub fn for_index(index: PathBuf) -> Self {
        Self {
            index,
            library: None,
            model: None,
            hub: HubOptions::from_env(false, false),
            run: RunOptions::default(),
            token: None,
            cors: None,
            max_upload: 25 << 20,
            reindex_on_start: false,
            allow_hosts: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            decode_budget: crate::search::DEFAULT_DECODE_BUDGET,
        }
    }
}

/// Most connections open at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Where start-up stands.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Starting,
    LoadingModel,
    OpeningIndex,
    Ready,
    Failed,
}

/// A re-index job's event, as streamed to the page.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Progress { progress: serde_json::Value },
    Done { summary: serde_json::Value },
    Failed { message: String },
}

#[derive(Default)]
pub struct JobState {
    pub running: bool,
    pub progress: Option<Progress>,
    pub last_summary: Option<RunSummary>,
    pub last_error: Option<String>,
}

pub struct AppState {
    pub config: ServerConfig,
    pub engine: RwLock<Option<Arc<Engine>>>,
    pub lifecycle: Mutex<(Lifecycle, Option<String>)>,
    pub job: Mutex<JobState>,
    pub events: broadcast::Sender<JobEvent>,
    pub stop: AtomicBool,
    pub started: Instant,
    /// The address the server listens on, once it does.
    pub local_addr: std::sync::OnceLock<SocketAddr>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(config: ServerConfig) -> SharedState {
        let (events, _) = broadcast::channel(256);
        Arc::new(Self {
            config,
            engine: RwLock::new(None),
            lifecycle: Mutex::new((Lifecycle::Starting, None)),
            job: Mutex::new(JobState::default()),
            events,
            stop: AtomicBool::new(false),
            started: Instant::now(),
            local_addr: std::sync::OnceLock::new(),
        })
    }

    /// A server around an engine that is already loaded (tests, embedding).
    pub fn with_engine(config: ServerConfig, engine: Engine) -> SharedState {
        let state = Self::new(config);
        *state.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
        state.set_lifecycle(Lifecycle::Ready, None);
        state
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr.get().copied()
    }

    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn lifecycle(&self) -> (Lifecycle, Option<String>) {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_lifecycle(&self, phase: Lifecycle, message: Option<String>) {
        *self.lifecycle.lock().unwrap_or_else(|p| p.into_inner()) = (phase, message);
    }

    pub fn job(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads the model and opens the index on a thread of its own, then starts
/// a re-index if asked: the page is up while this happens.
pub fn start(state: SharedState, addr: SocketAddr) {
    std::thread::Builder::new()
        .name("clipdex-startup".into())
        .spawn(move || {
            if let Err(message) = load(&state, addr) {
                tracing::error!(%message, "start-up failed");
                state.set_lifecycle(Lifecycle::Failed, Some(message));
                return;
            }
            if state.config.reindex_on_start || state.config.library.is_some() {
                if let Err(e) = start_reindex(&state) {
                    tracing::warn!(error = %e.message, "could not start indexing");
                }
            }
        })
        .expect("spawn start-up thread");
}

/// How often start-up tries again for an index another process holds.
const LOCK_RETRY: Duration = Duration::from_secs(2);

/// Runs `open` until the index is not held by another process (a `clipdex
/// index` run, say), showing that on the page meanwhile; stops on shutdown.
fn wait_for_lock<T>(state: &AppState, mut open: impl FnMut() -> indexer::Result<T>) -> indexer::Result<T> {
    loop {
        match open() {
            Err(indexer::Error::InUse { holder, .. }) => {
                if state.stop.load(Ordering::Relaxed) {
                    return Err(indexer::Error::Stopped("stopped while waiting for the index".into()));
                }
                let (phase, _) = state.lifecycle();
                let holder = holder.trim().trim_start_matches('(').trim_end_matches(')').trim().to_string();
                let by = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
                state.set_lifecycle(phase, Some(format!("waiting for another clipdex process to release the index{by}")));
                std::thread::sleep(LOCK_RETRY);
            }
            other => return other,
        }
    }
}

fn load(state: &SharedState, addr: SocketAddr) -> Result<(), String> {
    let config = &state.config;
    // The model named, else the index's own.
    let existing = crate::indexer::IndexPaths::new(&config.index).exists();
    let model_id = match (&config.model, existing) {
        (Some(m), _) => m.clone(),
        (None, true) => {
            state.set_lifecycle(Lifecycle::OpeningIndex, Some("reading the index".into()));
            let index = wait_for_lock(state, || Index::open(&config.index)).map_err(|e| e.to_string())?;
            let id = index.meta().model.id.clone();
            drop(index);
            id
        }
        (None, false) => crate::model::DEFAULT_MODEL.to_string(),
    };
    state.set_lifecycle(Lifecycle::LoadingModel, Some(format!("loading model {model_id}")));
    let source = ModelSource::parse(&model_id).map_err(|e| e.to_string())?;
    let clip = Clip::load(&source, &config.hub).map_err(|e| format!("cannot load model {model_id}: {e}"))?;
    state.set_lifecycle(Lifecycle::OpeningIndex, Some("opening the index".into()));
    let open = || match &config.library {
        Some(library) => Index::create_or_open(&config.index, library, clip.info()),
        None => Index::open(&config.index),
    };
    let index = wait_for_lock(state, open).map_err(|e| match e {
        indexer::Error::NotFound(_) => format!(
            "no index at {}: start with `clipdex serve --library <PHOTOS>` to create one",
            config.index.display()
        ),
        other => other.to_string(),
    })?;
    index.set_holder(&format!("clipdex serve at http://{addr}"));
    let engine = Engine::new(Arc::new(index), Arc::new(clip))
        .map_err(|e| e.to_string())?
        .with_upload_limits(config.run.limits, config.decode_budget);
    *state.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
    state.set_lifecycle(Lifecycle::Ready, None);
    tracing::info!("ready");
    Ok(())
}

/// Starts a re-index on its own thread; one at a time.
pub fn start_reindex(state: &SharedState) -> Result<(), crate::server::error::ApiError> {
    use crate::server::error::ApiError;
    let engine = state.engine().ok_or_else(|| ApiError::not_ready("the index is not open yet"))?;
    {
        let mut job = state.job();
        if job.running {
            return Err(ApiError::conflict("a re-index is already running"));
        }
        job.running = true;
        job.last_error = None;
    }
    let state = state.clone();
    std::thread::Builder::new()
        .name("clipdex-reindex".into())
        .spawn(move || {
            let mut last_sent = Instant::now() - Duration::from_secs(1);
            let mut callback = |p: &Progress| {
                state.job().progress = Some(p.clone());
                // At most 10 events a second, and every phase change.
                if last_sent.elapsed() >= Duration::from_millis(100) || p.phase != indexer::Phase::Indexing {
                    last_sent = Instant::now();
                    let progress = serde_json::to_value(p).unwrap_or_default();
                    let _ = state.events.send(JobEvent::Progress { progress });
                }
            };
            // A panic inside the run (a bug) must not leave the job marked
            // running forever: it is reported like any failure.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                indexer::run(engine.index(), engine.clip(), &state.config.run, &mut callback, &state.stop)
            }))
            .unwrap_or_else(|payload| {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(indexer::Error::Stopped(format!("internal error: {message}")))
            });
            let mut job = state.job();
            job.running = false;
            match result {
                Ok(summary) => {
                    let _ = state.events.send(JobEvent::Done { summary: serde_json::to_value(&summary).unwrap_or_default() });
                    job.last_summary = Some(summary);
                }
                Err(e) => {
                    let message = e.to_string();
                    tracing::error!(%message, "re-index failed");
                    job.last_error = Some(message.clone());
                    let _ = state.events.send(JobEvent::Failed { message });
                }
            }
        })
        .map_err(|e| ApiError::internal(e))?;
    Ok(())
}

/// The model of a ready engine.
pub fn model_info(state: &AppState) -> Option<ModelInfo> {
    state.engine().map(|e| e.clip().info().clone())
}

/// Asks a running job to stop after its current batch (on shutdown).
pub fn stop_jobs(state: &AppState) {
    state.stop.store(true, Ordering::Relaxed);
}
