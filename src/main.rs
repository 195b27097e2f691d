use std::process::ExitCode;

use clap::Parser;
use clipdex::cli::{self, Cli, Command};
use clipdex::library::memory::MI_OPTION_PURGE_DELAY;
use tracing_subscriber::EnvFilter;

// Inference allocates and frees large tensors at a high rate; glibc returns
// them to the kernel and pays page faults on every reuse. mimalloc keeps them:
// ViT-B/32 at batch 16 runs about 25% faster.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Keep freed pages instead of returning them to the kernel after 10 ms:
    // training and inference free and reallocate the same large buffers at
    // every step, and each return costs page faults (about 15% of a training
    // step, 6% of the server's text-query throughput). The server gives back
    // the memory of large decodes itself (`library::memory`).
    // SAFETY: a plain option setter, called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Commands that print results end quietly when the reader goes away
    // (`clipdex status --json | head`), as Unix tools do, instead of
    // panicking on the failed write. Commands that change an index are left
    // to finish their work (their output is progress, on stderr).
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Search(_)
            | Command::Similar(_)
            | Command::Duplicates(_)
            | Command::Tags(_)
            | Command::Embed(_)
            | Command::Eval(_)
    ) {
        // SAFETY: restores the default action before any other thread exists;
        // these commands write to sockets only through std, which passes
        // MSG_NOSIGNAL, so only a closed stdout ends them.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // candle's element-wise thread pool spins 25,000 times before it sleeps;
    // on a machine with few cores that spinning takes the CPU from the matrix
    // multiplies (2,000 makes ViT-B/32 inference 10-30% and training about 15%
    // faster on 2 cores).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000") };
    }
    if let Some(threads) = cli.threads {
        // candle's matrix multiply sizes its thread pool from this variable;
        // set it before any pool starts.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
    }
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
