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

use crate::indexer::{self, Progress, RunOptions, RunSummary};
use crate::search::{self, Engine, HubOptions, OpenError, OpenOptions, Step, Towers};

/// Settings of a running server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub index: PathBuf,
    /// Library to index at start; `None` serves an existing index.
    pub library: Option<PathBuf>,
    /// Model to use; `None` takes the index's.
    pub model: Option<String>,
    /// The model's precision; `None` takes the index's (for a new one,
    /// `model::default_precision`).
    pub precision: Option<crate::search::Precision>,
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
            precision: None,
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
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn lifecycle(&self) -> (Lifecycle, Option<String>) {
        self.lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
            if let Err(e) = load(&state, addr) {
                // The log has it all; the page and the API get words without paths.
                tracing::error!(error = %e, "start-up failed");
                state.set_lifecycle(Lifecycle::Failed, Some(e.public_message()));
                return;
            }
            if state.config.reindex_on_start || state.config.library.is_some() {
                if let Err(e) = start_reindex(&state) {
                    tracing::warn!(error = %e, "could not start indexing");
                }
            }
        })
        .expect("spawn start-up thread");
}

fn load(state: &SharedState, addr: SocketAddr) -> Result<(), OpenError> {
    let config = &state.config;
    let opts = OpenOptions {
        index: &config.index,
        library: config.library.as_deref(),
        model: config.model.as_deref(),
        precision: config.precision,
        hub: &config.hub,
        towers: Towers::Both,
        wait: Some(&state.stop),
    };
    let engine = search::open(&opts, &mut |step| {
        let (phase, message) = match step {
            Step::ReadingIndex => (Lifecycle::OpeningIndex, "reading the index".to_string()),
            Step::LoadingModel(id) => (Lifecycle::LoadingModel, format!("loading model {id}")),
            Step::OpeningIndex => (Lifecycle::OpeningIndex, "opening the index".to_string()),
            Step::WaitingFor(holder) => (
                state.lifecycle().0,
                format!(
                    "waiting for another clipdex process to release the index (pid {})",
                    holder.pid
                ),
            ),
        };
        state.set_lifecycle(phase, Some(message));
    })?;
    engine
        .index()
        .set_holder("clipdex serve", Some(&format!("http://{addr}")));
    if engine.index().vectors().is_replica() {
        crate::indexer::replica::keep_synced(engine.index().clone());
    }
    let engine = engine.with_upload_limits(config.run.limits, config.decode_budget);
    *state.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
    state.set_lifecycle(Lifecycle::Ready, None);
    tracing::info!("ready");
    Ok(())
}

/// Why a re-index could not start.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the index is not open yet")]
    NotReady,
    #[error("a re-index is already running")]
    AlreadyRunning,
    #[error("cannot start the re-index thread: {0}")]
    Spawn(std::io::Error),
}

/// Starts a re-index on its own thread; one at a time.
pub fn start_reindex(state: &SharedState) -> Result<(), JobError> {
    let engine = state.engine().ok_or(JobError::NotReady)?;
    {
        let mut job = state.job();
        if job.running {
            return Err(JobError::AlreadyRunning);
        }
        job.running = true;
        job.last_error = None;
    }
    let on_failure = state.clone();
    let state = state.clone();
    std::thread::Builder::new()
        .name("clipdex-reindex".into())
        .spawn(move || {
            let mut last_sent = Instant::now() - Duration::from_secs(1);
            let mut callback = |p: &Progress| {
                state.job().progress = Some(p.clone());
                // At most 10 events a second, and every phase change.
                if last_sent.elapsed() >= Duration::from_millis(100)
                    || p.phase != indexer::Phase::Indexing
                {
                    last_sent = Instant::now();
                    let progress = serde_json::to_value(p).unwrap_or_default();
                    let _ = state.events.send(JobEvent::Progress { progress });
                }
            };
            // A panic inside the run (a bug) must not leave the job marked
            // running forever: it is reported like any failure.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                indexer::run(
                    engine.index(),
                    engine.clip(),
                    &state.config.run,
                    &mut callback,
                    &state.stop,
                )
            }))
            .unwrap_or_else(|payload| {
                Err(indexer::Error::Stopped(format!(
                    "internal error: {}",
                    crate::common::panic_message(&*payload)
                )))
            });
            let mut job = state.job();
            job.running = false;
            match result {
                Ok(summary) => {
                    let _ = state.events.send(JobEvent::Done {
                        summary: serde_json::to_value(&summary).unwrap_or_default(),
                    });
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
        .map_err(JobError::Spawn)
        .inspect_err(|_| on_failure.job().running = false)?;
    Ok(())
}

/// Asks a running job to stop after its current batch (on shutdown).
pub fn stop_jobs(state: &AppState) {
    state.stop.store(true, Ordering::Relaxed);
}
