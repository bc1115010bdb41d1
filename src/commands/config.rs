//! `easel config check|show` and `easel plugins`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use easel_config::ConfigLayers;
use easel_core::{OptionSpec, Registry};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate config files (each laid over the defaults); every problem is listed.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the merged configuration: defaults < FILES, in order.
    Show { files: Vec<PathBuf> },
}

pub fn config(cmd: ConfigCommand, registry: &Registry) -> Result<()> {
    match cmd {
        ConfigCommand::Check { files } => {
            let mut failed = 0;
            for file in &files {
                match ConfigLayers::defaults().with_file(file).and_then(|l| l.plan(registry)) {
                    Ok(plan) => {
                        let losses: Vec<&str> = plan.losses.iter().map(|l| l.kind).collect();
                        println!(
                            "{}: ok (losses: {}; optimizer: {}; size {}, {} iterations x {} scale(s))",
                            file.display(),
                            losses.join(", "),
                            plan.optimizer.kind,
                            plan.run.size,
                            plan.run.iterations,
                            plan.run.scales
                        );
                    }
                    Err(e) => {
                        eprintln!("{}: {e}", file.display());
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} config file(s) are invalid", files.len());
            }
            Ok(())
        }
        ConfigCommand::Show { files } => {
            let mut layers = ConfigLayers::defaults();
            for file in &files {
                layers = layers.with_file(file)?;
            }
            layers.plan(registry)?;
            print!("{}", toml::to_string_pretty(&layers.merged())?);
            Ok(())
        }
    }
}

fn print_options(options: &[OptionSpec]) {
    if options.is_empty() {
        println!("    (no options)");
    }
    for o in options {
        let default = o.default.to_string();
        println!("    {:<20} {:<28} default {default:<12} {}", o.key, o.kind, o.doc);
    }
}

pub fn plugins(registry: &Registry) -> Result<()> {
    println!("Losses ([[loss]] type = ...; every loss also takes `weight`, a number > 0, default 1):");
    for f in registry.losses() {
        println!("  {:<10} {}", f.name(), f.summary());
        print_options(f.options());
    }
    println!("\nOptimizers ([optimizer] type = ...):");
    for f in registry.optimizers() {
        println!("  {:<10} {}", f.name(), f.summary());
        print_options(f.options());
    }
    Ok(())
}
