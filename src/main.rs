use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use huren::config::NodeArgs;
use huren::node::{self, Node};
use huren::verify;

/// huren: the imaging result-sharing node of a regional health cloud.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hospital node: DICOM server (C-ECHO, C-STORE) and HTTP.
    Node(NodeArgs),
    /// Check every indexed blob against its BLAKE3 key; report missing,
    /// corrupt and orphaned blobs. Exits 1 if any blob is missing or corrupt.
    Verify {
        #[command(flatten)]
        node: NodeArgs,
        /// Delete orphaned blobs (blobs no index row names) older than
        /// --orphan-grace-secs.
        #[arg(long)]
        remove_orphans: bool,
        /// Orphans younger than this may belong to an ingest in progress on
        /// a running node and are never removed.
        #[arg(long, default_value_t = 3600)]
        orphan_grace_secs: u64,
        /// Rebuild the index from the blob store: index every blob the index
        /// does not name.
        #[arg(long)]
        reindex: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Operators and tests read the log from files and pipes: no colour
        // codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("huren: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node(args) => {
            let config = args.resolve()?;
            let dicom = TcpListener::bind(config.dicom_listen)
                .await
                .with_context(|| format!("cannot listen for DICOM on {}", config.dicom_listen))?;
            let http = TcpListener::bind(config.http_listen)
                .await
                .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
            let shutdown = CancellationToken::new();
            let node = Node::start(&config, dicom, http, shutdown.clone()).await?;
            wait_for_signal().await;
            tracing::info!("shutting down: no new associations; finishing those in progress");
            shutdown.cancel();
            node.wait().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            node: args,
            remove_orphans,
            orphan_grace_secs,
            reindex,
        } => {
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            let options = verify::Options {
                remove_orphans,
                orphan_grace: Duration::from_secs(orphan_grace_secs),
                reindex,
                progress: true,
            };
            let report = verify::run(&ingest, &options).await?;
            println!(
                "blobs verified: {} ({} bytes)",
                report.blobs_checked, report.bytes_checked
            );
            if reindex {
                println!("blobs reindexed: {}", report.reindexed);
            }
            for (hash, why) in &report.unindexable {
                println!("unindexable: {hash}: {why}");
            }
            for hash in &report.missing {
                println!("missing: {hash}");
            }
            for hash in &report.corrupt {
                println!("corrupt: {hash}");
            }
            println!("missing: {}", report.missing.len());
            println!("corrupt: {}", report.corrupt.len());
            println!(
                "orphans: {} (not errors: blobs of instances never acknowledged){}",
                report.orphans.len(),
                if remove_orphans {
                    format!("; removed {}", report.orphans_removed)
                } else {
                    String::new()
                }
            );
            ingest.index().close().await;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
