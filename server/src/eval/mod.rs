//! `parley eval`: the agent's task success rate on scripted conversations.
//!
//! Each conversation of an evaluation set ([`set`], e.g. `bench/eval/pharmacy.toml`)
//! runs through the real agent in-process ([`drive`]): the configured models, a
//! fresh in-memory pharmacy database, the user turns sent as text. What the agent
//! did (tool calls, spoken replies) is scored against the set's expectations
//! ([`check`]). The report is one line per conversation, the success rate overall
//! and per category, and the time per turn (mean and median); the exit status is 0 whatever the score (it is a measurement) and non-zero only when
//! the evaluation could not run.
//!
//! The agent's audio is synthesized as in a call but not paced in real time, so the
//! timings measure the models, not the length of the speech.

mod check;
mod drive;
mod numbers;
mod set;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::config::Config;
use check::{ConversationCheck, Failure, FailureKind, TurnRecord, describe_calls};
use set::{Conversation, EvalSet};

/// Pacing lead that lets a response's audio out as fast as it is synthesized.
const UNPACED_LEAD_MS: u32 = 3_600_000;

/// Options of `parley eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The evaluation set (TOML).
    #[arg(long, default_value = "bench/eval/pharmacy.toml")]
    set: PathBuf,
    /// An installed language model by name: `qwen2.5-coder-0.5b` (default) or
    /// `qwen1.5b` (`parley models install --extra qwen1.5b`).
    #[arg(long, conflicts_with = "llm_gguf")]
    model: Option<String>,
    /// A Qwen2 GGUF file to evaluate instead of an installed model.
    #[arg(long)]
    llm_gguf: Option<PathBuf>,
    /// The GGUF's tokenizer.json (default: built from the GGUF's metadata).
    #[arg(long, requires = "llm_gguf")]
    llm_tokenizer: Option<PathBuf>,
    /// Run only the conversations whose name contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Print every turn: the user's words, the tool calls and results, the reply.
    #[arg(long, short)]
    verbose: bool,
    /// A server configuration file for the agent's settings (instructions,
    /// temperature, LLM options); its tools are replaced by the pharmacy desk.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Models folder.
    #[arg(long, env = "PARLEY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Longest wait for one response, in seconds.
    #[arg(long, default_value_t = 300)]
    turn_timeout: u64,
}

/// Runs the evaluation and prints the report.
pub fn run(args: EvalArgs) -> Result<()> {
    init_logging();
    let config = config(&args)?;
    // SAFETY: no other thread exists yet (this sets environment variables).
    unsafe { parley_llm::cpu::set_model_threads(config.llm.threads) };
    let set = EvalSet::load(&args.set)?;
    let conversations: Vec<&Conversation> =
        set.conversations.iter().filter(|c| args.only.is_empty() || args.only.iter().any(|o| c.name.contains(o.as_str()))).collect();
    if conversations.is_empty() {
        bail!("no conversation in {} matches --only {}", args.set.display(), args.only.join(", "));
    }
    let checks = conversations.iter().map(|c| ConversationCheck::new(c, &set.private)).collect::<Result<Vec<_>>>()?;

    let model = match &config.models.llm_gguf {
        gguf if !gguf.is_empty() => gguf.clone(),
        _ => config.models.llm.clone(),
    };
    eprintln!("loading the models ({model}) …");
    let engines = crate::engines::load(&config)?;
    let mut settings = config.session_defaults();
    settings.turn_detection = None;
    settings.pacing.lead_ms = UNPACED_LEAD_MS;
    let driver = drive::Driver { engines, settings, turn_timeout: Duration::from_secs(args.turn_timeout) };
    println!("evaluating {} conversations from {} with {model}", conversations.len(), args.set.display());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let mut score = Score::default();
    for (conversation, check) in conversations.iter().zip(&checks) {
        let run = runtime.block_on(driver.run(conversation))?;
        let failures = check.check(&run.records);
        println!("{}", line(conversation, &run, &failures));
        if args.verbose {
            print_turns(conversation, &run.records, &failures);
        }
        score.add(conversation, &run, &failures);
    }
    score.print(&model);
    Ok(())
}

/// Logs at `warn` unless `PARLEY_LOG` says otherwise, so the report stays readable.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// The configuration the agent runs with: the file's (or the defaults), the model
/// chosen on the command line, and no server tools (each conversation gets its own
/// pharmacy database).
fn config(args: &EvalArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.models_dir {
        config.models.dir = dir.to_string_lossy().into_owned();
    }
    if let Some(model) = &args.model {
        config.models.llm = crate::models::llm_model(model)?.name.to_string();
        config.models.llm_gguf.clear();
        config.models.llm_tokenizer.clear();
    }
    if let Some(gguf) = &args.llm_gguf {
        config.models.llm_gguf = gguf.to_string_lossy().into_owned();
        config.models.llm_tokenizer = args.llm_tokenizer.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    }
    if args.model.is_some() || args.llm_gguf.is_some() {
        config.llm.replicas.clear();
    }
    config.tools.pharmacy = false;
    config.tools.http.clear();
    config.validate()?;
    Ok(config)
}

/// `PASS  name  (2 turns, 14.2 s)`, or `FAIL …` with the first failure.
fn line(conversation: &Conversation, run: &drive::Run, failures: &[Failure]) -> String {
    let verdict = if failures.is_empty() { "PASS" } else { "FAIL" };
    let turns = conversation.turns.len();
    let mut out = format!(
        "{verdict}  {:<28} {turns} turn{} {:>6.1} s",
        conversation.name,
        if turns == 1 { " " } else { "s" },
        run.elapsed.as_secs_f64()
    );
    if let Some(first) = failures.first() {
        out.push_str(&format!("  {}", shorten(&first.to_string(), 160)));
        if failures.len() > 1 {
            out.push_str(&format!(" (+{} more)", failures.len() - 1));
        }
    }
    out
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}…")
}

/// Every turn of a conversation in full, then every failure.
fn print_turns(conversation: &Conversation, records: &[TurnRecord], failures: &[Failure]) {
    for (i, turn) in conversation.turns.iter().enumerate() {
        println!("    [{}] caller: {}", i + 1, turn.user);
        let Some(record) = records.get(i) else {
            println!("        (not run)");
            continue;
        };
        if let Some(heard) = &record.heard {
            println!("        heard:  {heard}");
        }
        if !record.calls.is_empty() {
            println!("        calls:  {}", describe_calls(&record.calls));
        }
        for output in &record.outputs {
            println!("        result: {}", shorten(output, 300));
        }
        println!("        agent:  {}", record.reply);
        if let Some(error) = &record.error {
            println!("        error:  {error}");
        }
    }
    for failure in failures {
        println!("    ✗ {failure}");
    }
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }
}

/// Totals over the run.
#[derive(Default)]
struct Score {
    total: usize,
    passed: usize,
    turns: usize,
    seconds: f64,
    /// Seconds of each turn, for the median.
    turn_seconds: Vec<f64>,
    /// Category → (passed, total).
    categories: BTreeMap<String, (usize, usize)>,
    /// Failure kind → the conversations that had it.
    patterns: BTreeMap<FailureKind, Vec<String>>,
}

impl Score {
    fn add(&mut self, conversation: &Conversation, run: &drive::Run, failures: &[Failure]) {
        self.total += 1;
        self.passed += usize::from(failures.is_empty());
        self.turns += run.records.len();
        self.seconds += run.elapsed.as_secs_f64();
        self.turn_seconds.extend(run.records.iter().map(|r| r.seconds));
        let category = self.categories.entry(conversation.category.clone()).or_default();
        category.0 += usize::from(failures.is_empty());
        category.1 += 1;
        for failure in failures {
            let names = self.patterns.entry(failure.kind).or_default();
            if !names.contains(&conversation.name) {
                names.push(conversation.name.clone());
            }
        }
    }

    fn print(&self, model: &str) {
        let rate = 100.0 * self.passed as f64 / self.total.max(1) as f64;
        let turns_per_s = self.turns as f64 / self.seconds.max(1e-9);
        println!();
        println!("model:        {model}");
        println!("task success: {}/{} ({rate:.1}%)", self.passed, self.total);
        println!(
            "turns:        {} in {:.1} s: {turns_per_s:.3} turns/s ({:.1} s per turn, p50 {:.1} s)",
            self.turns,
            self.seconds,
            self.seconds / self.turns.max(1) as f64,
            median(&self.turn_seconds)
        );
        println!("by category:");
        for (category, (passed, total)) in &self.categories {
            println!("  {category:<20} {passed}/{total} ({:.0}%)", 100.0 * *passed as f64 / (*total).max(1) as f64);
        }
        println!("failure patterns:");
        for (kind, names) in &self.patterns {
            println!("  {:<20} {} conversation{}: {}", kind.label(), names.len(), if names.len() == 1 { "" } else { "s" }, names.join(", "));
        }
    }
}
