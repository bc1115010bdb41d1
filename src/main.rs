//! The `easel` command line: parses flags, sets up logging, and hands over to the libraries.

mod commands;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "easel", version, about = "Neural style transfer (Gatys et al.) for small machines")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Worker threads for the tensor kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Paint CONTENT in the style of STYLE and write the result.
    Run(commands::run::RunArgs),
    /// Each loss's value, share and gradient norm at an image (a table, or --json): for balancing loss weights.
    Eval(commands::eval::EvalArgs),
    /// Time iterations and measure peak memory, as JSON.
    Bench(commands::bench::BenchArgs),
    /// What a job would take: peak memory against the budget, and seconds per evaluation.
    Plan(commands::plan::PlanArgs),
    /// Get, make and check VGG-19 weights files.
    #[command(subcommand)]
    Weights(commands::weights::WeightsCommand),
    /// Check or show configuration files.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// List the loss and optimiser plugins and their options.
    Plugins,
    /// Run the drop-folder daemon on ROOT: photos dropped into ROOT/inbox/ become paintings in ROOT/out/.
    Watch(commands::watch::WatchArgs),
    /// One attempt at a drop-folder job, in a worker process `easel watch` starts.
    #[command(hide = true)]
    Job(commands::job::JobArgs),
}

fn init_logging(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes are noise in a log file, a pipe or journald; https://no-color.org says a
    // non-empty NO_COLOR turns them off even on a terminal.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle's CPU kernels size their thread pools from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    init_logging(cli.log_format, cli.verbose);
    // Evaluations free and reallocate tens of MB at a time: keep those blocks mapped.
    if !easel_vgg::alloc::reuse_large_blocks() {
        tracing::debug!("the allocator keeps its own policy for large blocks");
    }
    let registry = easel_plugins::builtin();
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args, &registry),
        Command::Eval(args) => commands::eval::eval(args, &registry),
        Command::Bench(args) => commands::bench::bench(args, &registry),
        Command::Plan(args) => commands::plan::plan(args, &registry),
        Command::Weights(cmd) => commands::weights::weights(cmd),
        Command::Config(cmd) => commands::config::config(cmd, &registry),
        Command::Plugins => commands::config::plugins(&registry),
        Command::Watch(args) => {
            // A job's worker logs as this process does, into the same stream.
            let mut worker_args = Vec::new();
            if cli.log_format == LogFormat::Json {
                worker_args.extend(["--log-format".into(), "json".into()]);
            }
            worker_args.extend((0..cli.verbose).map(|_| "-v".into()));
            if let Some(n) = cli.threads {
                worker_args.extend(["--threads".into(), n.to_string().into()]);
            }
            commands::watch::watch(args, worker_args, &registry)
        }
        Command::Job(args) => commands::job::job(args, &registry),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
