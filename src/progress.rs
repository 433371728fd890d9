//! Progress of long CLI work (verify, reindex, backup, restore, bulk
//! imports): a bar when stderr is a terminal, and otherwise a plain log line
//! every few seconds, so a run under systemd or cron leaves a readable
//! record instead of carriage-return noise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often the plain form logs a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    label: String,
    total: u64,
    unit: &'static str,
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
}

struct Plain {
    done: u64,
    bytes: u64,
    started: Instant,
    last_logged: Instant,
}

impl Progress {
    /// `unit` names what is counted ("blobs", "instances", "rows").
    pub fn new(label: &str, total: u64, unit: &'static str) -> Progress {
        Self::with_mode(label, total, unit, std::io::stderr().is_terminal())
    }

    /// Progress that shows nothing (tests, `--quiet`).
    pub fn hidden() -> Progress {
        Progress {
            label: String::new(),
            total: 0,
            unit: "",
            bar: Some(ProgressBar::hidden()),
            plain: Mutex::new(Plain::start()),
        }
    }

    fn with_mode(label: &str, total: u64, unit: &'static str, terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total);
            let template = format!(
                "{label} {{bar:40}} {{pos}}/{{len}} {unit} {{binary_bytes_per_sec}} eta {{eta}}"
            );
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
            bar
        });
        Progress {
            label: label.to_string(),
            total,
            unit,
            bar,
            plain: Mutex::new(Plain::start()),
        }
    }

    /// Counts `n` more items done, `bytes` of them moved or read.
    pub fn inc(&self, n: u64, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut plain = self.plain.lock().expect("progress lock");
        plain.done += n;
        plain.bytes += bytes;
        if plain.last_logged.elapsed() >= LOG_EVERY {
            plain.last_logged = Instant::now();
            self.log(&plain, "in progress");
        }
    }

    /// Ends the progress: clears the bar, or logs the final line.
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => {
                let plain = self.plain.lock().expect("progress lock");
                self.log(&plain, "done");
            }
        }
    }

    fn log(&self, plain: &Plain, state: &str) {
        let secs = plain.started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            done = plain.done,
            total = self.total,
            unit = self.unit,
            mb_per_s = format!("{:.1}", plain.bytes as f64 / 1e6 / secs),
            "{}: {state}",
            self.label
        );
    }
}

impl Plain {
    fn start() -> Plain {
        let now = Instant::now();
        Plain {
            done: 0,
            bytes: 0,
            started: now,
            last_logged: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_mode_counts_without_a_bar() {
        let progress = Progress::with_mode("verify", 3, "blobs", false);
        progress.inc(2, 10);
        progress.inc(1, 5);
        let plain = progress.plain.lock().unwrap();
        assert_eq!((plain.done, plain.bytes), (3, 15));
        assert!(progress.bar.is_none());
    }
}
