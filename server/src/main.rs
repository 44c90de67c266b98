//! `parley`: the voice-agent server, its command-line caller and its model installer.

mod app;
mod call_cli;
mod config;
mod driver;
mod engines;
mod listener;
mod eval;
mod keys;
mod limits;
mod metrics;
mod models;
mod openai_api;
mod realtime;
mod sagemaker;
mod serve;
mod sip;
mod stream;
mod telemetry;
mod twilio;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Parley: a self-hosted, streaming voice-agent server.
#[derive(Parser, Debug)]
#[command(name = "parley", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server on the installed models.
    Serve(serve::ServeArgs),
    /// Call a server: stream a WAV file (or text) in real time and save the reply.
    Call(call_cli::CallArgs),
    /// Install or check the model files.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
        /// Models folder (default: $PARLEY_MODELS_DIR or ~/.cache/parley/models).
        #[arg(long, global = true, env = "PARLEY_MODELS_DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the scripted evaluation conversations through the real agent and score them.
    Eval(eval::EvalArgs),
    /// Print the default configuration file, or check one.
    Config {
        /// A config file to validate instead of printing the defaults.
        #[arg(long)]
        check: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsAction {
    /// Fetch, verify, convert and cache every model (a no-op when done already).
    Install {
        /// Also install an optional model: `qwen1.5b` (Qwen2.5-Coder-1.5B-Instruct,
        /// 1.1 GB). Repeatable.
        #[arg(long)]
        extra: Vec<String>,
    },
    /// Check that every model file is present and intact (fast).
    Check,
    /// Re-hash every model file.
    Verify,
}

fn main() -> ExitCode {
    // Before anything runs an instruction this CPU may lack.
    if let Err(e) = parley_llm::cpu::check_cpu() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Call(args) => call_cli::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Models { action, dir } => {
            let dir = dir.unwrap_or_else(models::default_dir);
            let paths = match &action {
                ModelsAction::Install { extra } => models::install(&dir, extra)?,
                ModelsAction::Check => models::check(&dir)?,
                ModelsAction::Verify => models::verify(&dir)?,
            };
            if !matches!(action, ModelsAction::Install { .. }) {
                println!("models OK in {}", dir.display());
            }
            let _ = paths;
            Ok(())
        }
        Command::Config { check } => {
            match check {
                Some(path) => {
                    config::Config::load(&path)?;
                    println!("{} is valid", path.display());
                }
                None => print!("{}", toml::to_string_pretty(&config::Config::default())?),
            }
            Ok(())
        }
    }
}
