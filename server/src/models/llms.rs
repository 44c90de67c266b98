//! The embedded language models the installer can provide, by the names a config
//! file (`[models] llm`) and `parley eval --model` use.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::pins::{self, Installed};
use super::stamp::Stamp;

/// One installable language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmModel {
    /// Its name in configs and on the command line.
    pub name: &'static str,
    /// Shorter names accepted for it.
    pub aliases: &'static [&'static str],
    gguf: Installed,
    tokenizer: Installed,
    /// The `--extra` that installs it; `None` for the default model.
    extra: Option<&'static str>,
}

/// The model a server uses unless configured otherwise.
pub const DEFAULT_LLM: &str = "qwen2.5-coder-0.5b";

/// Every model, the default first.
pub const LLMS: [LlmModel; 2] = [
    LlmModel {
        name: DEFAULT_LLM,
        aliases: &["qwen0.5b"],
        gguf: pins::QWEN_GGUF,
        tokenizer: pins::QWEN_TOKENIZER,
        extra: None,
    },
    LlmModel {
        name: "qwen2.5-coder-1.5b",
        aliases: &["qwen1.5b"],
        gguf: pins::QWEN15_GGUF,
        tokenizer: pins::QWEN15_TOKENIZER,
        extra: Some("qwen1.5b"),
    },
];

/// A model's GGUF weights and `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmFiles {
    pub gguf: PathBuf,
    pub tokenizer: PathBuf,
}

/// The model called `name` (or one of its aliases), or an error listing the names.
pub fn llm_model(name: &str) -> Result<&'static LlmModel> {
    let name = name.trim();
    match LLMS.iter().find(|m| m.name.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))) {
        Some(model) => Ok(model),
        None => {
            let known: Vec<String> = LLMS.iter().map(|m| format!("{} ({})", m.name, m.aliases.join(", "))).collect();
            bail!("no language model called `{name}`; there are: {}", known.join(", "))
        }
    }
}

impl LlmModel {
    /// Its files under the models folder `dir`, after a fast check (as
    /// [`check`](super::check) does) that they are installed and intact.
    pub fn files(&self, dir: &Path) -> Result<LlmFiles> {
        let stamp = Stamp::load(dir);
        let problems: Vec<String> =
            [self.gguf, self.tokenizer].iter().filter_map(|f| stamp.problem(dir, f).map(|p| format!("{} ({p})", f.rel))).collect();
        if !problems.is_empty() {
            let fix = match self.extra {
                Some(extra) => format!("run `parley models install --extra {extra}`"),
                None => super::FIX.to_string(),
            };
            bail!("the language model {} in {} is not ready: {}; {fix}", self.name, dir.display(), problems.join(", "));
        }
        Ok(LlmFiles { gguf: dir.join(self.gguf.rel), tokenizer: dir.join(self.tokenizer.rel) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tests::TestDir;

    #[test]
    fn names_and_aliases_resolve() {
        assert_eq!(llm_model("qwen1.5b").expect("alias").name, "qwen2.5-coder-1.5b");
        assert_eq!(llm_model("Qwen2.5-Coder-0.5B").expect("name").name, DEFAULT_LLM);
        let err = llm_model("llama").expect_err("unknown").to_string();
        assert!(err.contains("qwen2.5-coder-1.5b"), "{err}");
    }

    #[test]
    fn a_missing_extra_names_its_install_command() {
        let dir = TestDir::new("llms");
        let err = llm_model("qwen1.5b").expect("known").files(dir.path()).expect_err("not installed");
        assert!(err.to_string().contains("--extra qwen1.5b"), "{err}");
    }
}
