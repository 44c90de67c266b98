//! What the installer tells people: bars on a terminal, plain lines elsewhere (CI logs).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Output mode, decided once from whether stderr is a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    interactive: bool,
}

impl Reporter {
    pub fn detect() -> Self {
        Self {
            interactive: std::io::stderr().is_terminal(),
        }
    }

    /// Plain lines only, whatever the output is (tests).
    #[cfg(test)]
    pub fn plain() -> Self {
        Self { interactive: false }
    }

    /// Whether progress bars (ours and pip's) are shown.
    pub fn interactive(&self) -> bool {
        self.interactive
    }

    /// One line of progress, on stdout in both modes.
    pub fn line(&self, msg: impl std::fmt::Display) {
        println!("{msg}");
    }

    /// A byte-count bar on a terminal (a byte counter when `len` is unknown, 0), a
    /// hidden one otherwise.
    pub fn bytes_bar(&self, len: u64, msg: &str) -> ProgressBar {
        if !self.interactive {
            return ProgressBar::hidden();
        }
        let (bar, template) = if len == 0 {
            (
                ProgressBar::new_spinner(),
                "  {spinner} {msg} {bytes} ({bytes_per_sec})",
            )
        } else {
            (
                ProgressBar::new(len),
                "  {msg} [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
        };
        let style =
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.with_style(style.progress_chars("=> "))
            .with_message(msg.to_string())
    }
}
