//! A progress bar with step, reward and ETA, drawn only when stderr is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The training progress bar; hidden (every call a no-op) when stderr is not a terminal, so CI logs
/// and redirected output stay clean.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total_steps`, starting at `start_step` (non-zero on resume).
    pub fn new(total_steps: u64, start_step: u64) -> Self {
        let visible = std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total_steps), target);
        // The template is a constant whose syntax is checked by `template_parses` below.
        let style =
            ProgressStyle::with_template(TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_position(start_step);
        bar.reset_eta();
        if visible {
            // Redraws the elapsed time and ETA between steps (a ticker thread: only when drawn).
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        Self { bar }
    }

    /// Moves the bar to `step` and shows the step's mean reward.
    pub fn update(&self, step: u64, reward_mean: Option<f64>) {
        self.bar.set_position(step);
        if let Some(reward) = reward_mean {
            self.bar.set_message(format!("reward {reward:.3}"));
        }
    }

    /// Replaces the bar's message (what the run is doing between steps).
    pub fn message(&self, message: &str) {
        self.bar.set_message(message.to_string());
    }

    /// Prints `line` above the bar without tearing it (use for occasional summaries).
    pub fn println(&self, line: impl AsRef<str>) {
        self.bar.println(line);
    }

    /// Whether the bar is drawn.
    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Leaves the bar in its final state.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

const TEMPLATE: &str = "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_and_hidden_bar_tracks_position() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
        let progress = Progress::new(10, 2);
        progress.update(5, Some(0.25));
        assert_eq!(progress.bar.position(), 5);
        assert_eq!(progress.bar.message(), "reward 0.250");
        progress.finish();
    }
}
