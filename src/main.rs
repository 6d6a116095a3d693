//! The `tally` binary: parse the command line, set up logging, run the command.

use clap::Parser;
use tally::cli::Cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many small strings
/// per event (decode, batch rows); glibc's malloc/free were ~20% of `tally run`'s CPU in a
/// profile, and its per-thread arenas fragment under the batch churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `tally run` serves many tasks at once: a worker per core. The other commands are one
    // task each: on one thread, a socket read wakes the task that waits for it directly
    // (a streaming `tally rerate` spent ~40% of its CPU in cross-thread wakeups).
    let runtime = match cli.command {
        tally::cli::Command::Run(ref settings) => {
            let nice = settings.pipeline_nice;
            tokio::runtime::Builder::new_multi_thread()
                .on_thread_start(move || tally::pipeline::lower_thread_priority(nice))
                .enable_all()
                .build()
        }
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match tally::commands::dispatch(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
