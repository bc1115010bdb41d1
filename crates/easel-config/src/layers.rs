//! Stacking configuration sources: later layers override earlier ones key by key.

use std::path::Path;

use easel_core::Registry;
use toml::{Table, Value};

use crate::{ConfigError, Plan};

/// The built-in defaults, `configs/default.toml`: the paper's set-up.
pub const DEFAULT_TOML: &str = include_str!("../../../configs/default.toml");

/// Configuration sources in increasing priority, merged on demand.
#[derive(Debug, Clone)]
pub struct ConfigLayers {
    layers: Vec<(String, Table)>,
}

/// Lays `over` onto `base`: tables merge key by key, everything else (arrays included) replaces.
///
/// A plugin table whose `type` changes is replaced whole: the old plugin's options would be
/// unknown keys to the new one.
pub fn merge(base: &mut Table, over: &Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Table(b)), Value::Table(o))
                if o.get("type").is_none_or(|t| b.get("type") == Some(t)) =>
            {
                merge(b, o)
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

fn parse(source_name: &str, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>()
        .map_err(|e| ConfigError::Syntax { source_name: source_name.to_string(), message: e.to_string() })
}

impl ConfigLayers {
    /// Just the built-in defaults.
    pub fn defaults() -> Self {
        // The defaults are part of the binary and checked by this crate's tests.
        let table = DEFAULT_TOML.parse::<Table>().expect("configs/default.toml is valid TOML");
        Self { layers: vec![("defaults".to_string(), table)] }
    }

    /// Adds a layer parsed from `text`, named `source_name` in errors.
    pub fn with_text(mut self, source_name: &str, text: &str) -> Result<Self, ConfigError> {
        self.layers.push((source_name.to_string(), parse(source_name, text)?));
        Ok(self)
    }

    /// Adds the TOML file at `path` as a layer.
    pub fn with_file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        self.with_text(&path.display().to_string(), &text)
    }

    /// Adds an already-built table (command-line flags) as a layer.
    pub fn with_table(mut self, source_name: &str, table: Table) -> Self {
        if !table.is_empty() {
            self.layers.push((source_name.to_string(), table));
        }
        self
    }

    /// All layers merged into one table.
    pub fn merged(&self) -> Table {
        let mut out = Table::new();
        for (_, table) in &self.layers {
            merge(&mut out, table);
        }
        out
    }

    /// The sources, lowest priority first, as `defaults < my.toml < flags`.
    pub fn describe(&self) -> String {
        self.layers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" < ")
    }

    /// Merges and validates into a plan, building the plugins through `registry`.
    pub fn plan(&self, registry: &Registry) -> Result<Plan, ConfigError> {
        Plan::from_table(self.merged(), registry)
            .map_err(|errors| ConfigError::Invalid { sources: self.describe(), errors })
    }
}
