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
    /// Print the merged configuration (defaults < FILES, in order), laid out as configs/default.toml.
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
            print!("{}", in_default_order(&layers.merged())?);
            Ok(())
        }
    }
}

/// Where `key` stands in `order`; keys it does not list come after, in their own order.
fn rank(order: &[String], key: &str) -> usize {
    order.iter().position(|k| k == key).unwrap_or(order.len())
}

/// The keys of a table of configs/default.toml, or of the tables of an array of them.
fn default_keys(item: Option<&toml_edit::Item>) -> Vec<String> {
    let mut keys = Vec::new();
    let mut add = |t: &toml_edit::Table| {
        for (k, _) in t.iter() {
            if !keys.iter().any(|have| have == k) {
                keys.push(k.to_string());
            }
        }
    };
    match item {
        Some(toml_edit::Item::Table(t)) => add(t),
        Some(toml_edit::Item::ArrayOfTables(a)) => a.iter().for_each(add),
        _ => {}
    }
    keys
}

/// `table` as TOML with its tables and their keys in the order of configs/default.toml
/// (`[run]` first, `[[loss]]` last) instead of the alphabetical order of a `toml::Table`.
fn in_default_order(table: &toml::Table) -> Result<String> {
    let defaults: toml_edit::DocumentMut = easel_config::DEFAULT_TOML.parse()?;
    let order: Vec<String> = defaults.iter().map(|(k, _)| k.to_string()).collect();
    let mut doc: toml_edit::DocumentMut = toml::to_string_pretty(table)?.parse()?;
    let sort = |t: &mut toml_edit::Table, keys: &[String], position: usize| {
        // The document is written in order of position; the root holds position 0.
        t.set_position(position + 1);
        t.decor_mut().set_prefix(if position == 0 { "" } else { "\n" });
        t.sort_values_by(|a, _, b, _| rank(keys, a).cmp(&rank(keys, b)));
    };
    let mut tops: Vec<(String, usize)> = doc.iter().map(|(k, _)| (k.to_string(), rank(&order, k))).collect();
    tops.sort_by_key(|(_, r)| *r);
    for (position, (key, _)) in tops.iter().enumerate() {
        let keys = default_keys(defaults.get(key));
        match doc.get_mut(key) {
            Some(toml_edit::Item::Table(t)) => sort(t, &keys, position),
            Some(toml_edit::Item::ArrayOfTables(a)) => a.iter_mut().for_each(|t| sort(t, &keys, position)),
            _ => {}
        }
    }
    Ok(doc.to_string())
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
