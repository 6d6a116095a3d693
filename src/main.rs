//! The `tally` binary: parse the command line, set up logging, run the command.

use clap::Parser;
use tally::cli::Cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many small strings
/// per event (decode, batch rows); glibc's malloc/free were ~20% of `tally run`'s CPU in a
/// profile, and its per-thread arenas fragment under the batch churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match tally::commands::dispatch(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
