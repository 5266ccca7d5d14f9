//! Progress bars for `shoal pull`: one per layer, on stderr, hidden when it is not a terminal.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Outcome;

/// The bars of one pull.
#[derive(Clone, Debug)]
pub struct Progress {
    bars: MultiProgress,
}

/// One layer's bar.
#[derive(Clone, Debug)]
pub struct LayerBar {
    bar: ProgressBar,
}

impl Progress {
    /// Bars on stderr when it is a terminal (`visible`), nothing otherwise.
    pub fn new(visible: bool) -> Self {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            bars: MultiProgress::with_draw_target(target),
        }
    }

    pub fn layer(&self, digest: &str, size: u64) -> LayerBar {
        let bar = self.bars.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {msg:>10} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let short = digest.strip_prefix("sha256:").unwrap_or(digest);
        bar.set_prefix(short.chars().take(12).collect::<String>());
        bar.set_message("preparing");
        LayerBar { bar }
    }
}

impl LayerBar {
    pub fn advance(&self, n: u64) {
        self.bar.set_message("fetching");
        self.bar.inc(n);
    }

    pub fn set(&self, n: u64) {
        self.bar.set_message("fetching");
        self.bar.set_position(n);
    }

    pub fn finish(&self, outcome: Outcome) {
        let message = match outcome {
            Outcome::Lazy => "lazy",
            Outcome::Unpacked => "unpacked",
            Outcome::Present => "present",
        };
        self.bar.set_message(message);
        self.bar.abandon();
    }
}
