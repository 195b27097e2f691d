//! `clipdex serve`: the page is up at once; the model loads and the library
//! indexes in the background.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use super::ServeArgs;
use super::index::options;
use crate::indexer::tags::Tagging;
use crate::model::HubOptions;
use crate::server::{self, AppState, ServerConfig};

pub fn run(args: &ServeArgs) -> Result<()> {
    let addr: SocketAddr = args
        .bind
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            args.bind
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".into()))
        })
        .map_err(|e| anyhow::anyhow!("cannot use --bind {}: {e}", args.bind))?;
    let token = args.token.clone().filter(|t| !t.is_empty());
    if !server::is_local(&addr) && token.is_none() {
        bail!(
            "binding {addr} makes your photos reachable from other machines; give a token with --token (or CLIPDEX_TOKEN), \
             or bind 127.0.0.1"
        );
    }
    if let Some(library) = &args.library {
        if !library.is_dir() {
            bail!("the library {} is not a folder", library.display());
        }
    }
    let run = options(&args.run, &args.tags)?;
    let config = ServerConfig {
        index: args.index.clone(),
        library: args.library.clone(),
        model: args.model.clone(),
        precision: args.precision,
        hub: HubOptions::from_env(args.offline, false),
        reindex_on_start: args.reindex || run.tags != Tagging::Keep,
        run,
        token,
        cors: args.cors.clone(),
        max_upload: args.max_upload_mb.max(1) << 20,
        allow_hosts: args
            .allow_hosts
            .iter()
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        max_connections: args.max_connections.max(1),
        decode_budget: args.max_decode_mb.max(1) << 20,
    };
    // Searches run on the blocking pool and are CPU-bound: more threads than
    // a few per core add no throughput, only memory (each thread's visited
    // list for the graph is 4 bytes a photo, 4 MB at a million). Tokio's
    // default of 512 let 32 clients grow the resident set by 680 MB at 1M;
    // 16 on 2 cores, 110 MB, at the same throughput (8 lost 15% of it).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads((8 * cores).clamp(16, 128))
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let state = AppState::new(config);
        server::state::start(state.clone(), addr);
        let shown = if addr.ip().is_unspecified() {
            format!("http://localhost:{}", addr.port())
        } else {
            format!("http://{addr}")
        };
        eprintln!("clipdex is up at {shown}");
        if args.library.is_some() {
            eprintln!(
                "indexing {} in the background; the page shows the progress",
                args.library
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
        }
        server::serve(state, listener)
            .await
            .context("server failed")
    })
}
