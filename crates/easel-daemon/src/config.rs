//! The daemon's own config file and a job's sidecar as config layers: loaded, checked, and with
//! style names resolved inside `styles/`.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use easel_config::{ConfigError, ConfigLayers, DaemonSettings, Plan};
use easel_core::Registry;
use toml::{Table, Value};

use crate::folders::Root;
use crate::DaemonError;

/// A sidecar larger than this is not a config file.
const MAX_SIDECAR_BYTES: u64 = 64 << 10;

/// What identifies a version of the config file on disk, to notice edits.
pub type Fingerprint = Option<(SystemTime, u64)>;

/// The fingerprint of `path` now.
pub fn fingerprint(path: &Path) -> Fingerprint {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The daemon's config (`--config`), checked: a valid base for every job.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    source: Option<PathBuf>,
    table: Table,
    /// Its `[daemon]` section (defaults where it is silent).
    pub settings: DaemonSettings,
    /// The file's fingerprint when it was read.
    pub fingerprint: Fingerprint,
}

/// Resolves a `[[style]] path` against `styles/`: relative names are looked up there (and must
/// stay there when `confined`, as a job's sidecar must); returns the canonical file.
fn resolve_style(root: &Root, raw: &str, confined: bool) -> Result<PathBuf, String> {
    let path = Path::new(raw);
    let escapes = path.is_absolute() || path.components().any(|c| !matches!(c, Component::Normal(_)));
    if confined && escapes {
        return Err(format!(
            "style path \"{raw}\" must be a file name inside styles/ (no absolute path, no \"..\")"
        ));
    }
    let full = if path.is_absolute() { path.to_path_buf() } else { root.styles().join(path) };
    let canonical = full
        .canonicalize()
        .map_err(|_| format!("style \"{raw}\" not found (looked for {})", full.display()))?;
    if confined && !canonical.starts_with(root.styles().canonicalize().unwrap_or(root.styles())) {
        return Err(format!("style \"{raw}\" leads outside styles/ (to {})", canonical.display()));
    }
    if !canonical.is_file() {
        return Err(format!("style \"{raw}\" is not a file"));
    }
    Ok(canonical)
}

/// Replaces each `[[style]] path` in `table` by the file it names; every problem is returned.
fn resolve_styles(table: &mut Table, root: &Root, confined: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(Value::Array(styles)) = table.get_mut("style") else { return problems };
    for (i, style) in styles.iter_mut().enumerate() {
        let Value::Table(style) = style else { continue };
        let Some(Value::String(raw)) = style.get("path") else { continue };
        match resolve_style(root, raw, confined) {
            Ok(path) => {
                style.insert("path".into(), Value::String(path.display().to_string()));
            }
            Err(reason) => problems.push(format!("style[{i}].path: {reason}")),
        }
    }
    problems
}

fn parse(source_name: &str, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>()
        .map_err(|e| ConfigError::Syntax { source_name: source_name.to_string(), message: e.to_string() })
}

impl DaemonConfig {
    /// Reads and checks the daemon's config at `path` (or just the defaults). Relative style
    /// paths are looked up in `styles/`; the whole plan must be valid.
    pub fn load(path: Option<&Path>, root: &Root, registry: &Registry) -> Result<Self, DaemonError> {
        let (table, fingerprint) = match path {
            Some(path) => {
                let fingerprint = fingerprint(path);
                let text = std::fs::read_to_string(path)
                    .map_err(|source| DaemonError::Io { path: path.to_path_buf(), source })?;
                (parse(&path.display().to_string(), &text)?, fingerprint)
            }
            None => (Table::new(), None),
        };
        let mut table = table;
        let problems = resolve_styles(&mut table, root, false);
        if !problems.is_empty() {
            return Err(DaemonError::Styles(problems.join("; ")));
        }
        let config = Self {
            source: path.map(Path::to_path_buf),
            table,
            settings: DaemonSettings::default(),
            fingerprint,
        };
        let plan = config.layers().plan(registry)?;
        Ok(Self { settings: plan.daemon, ..config })
    }

    /// The file this config was read from.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// `defaults < this config`.
    pub fn layers(&self) -> ConfigLayers {
        let name = self.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "daemon".into());
        ConfigLayers::defaults().with_table(&name, self.table.clone())
    }

    /// The plan of a job without a sidecar.
    pub fn plan(&self, registry: &Registry) -> Result<Plan, ConfigError> {
        self.layers().plan(registry)
    }
}

/// Reads a job's sidecar into a config layer. Refuses what a job may not set (the daemon's
/// settings, input limits, weights, device) and any style outside `styles/`; every problem is
/// listed in the error.
pub fn sidecar_layer(path: &Path, root: &Root) -> Result<Table, String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::symlink_metadata(path).map_err(|e| format!("{name}: {e}"))?;
    root.check_link(path, &name).map_err(|e| e.to_string())?;
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > MAX_SIDECAR_BYTES {
        return Err(format!("{name}: larger than {MAX_SIDECAR_BYTES} bytes; not a sidecar"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let mut table = parse(&name, &text).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    for key in ["daemon", "limits"] {
        if table.contains_key(key) {
            problems.push(format!("{key}: cannot be set by a job's sidecar, only in the daemon's config"));
        }
    }
    if let Some(Value::Table(model)) = table.get("model") {
        // Which weights, and where and how the model runs, are the machine's to say.
        for key in ["weights", "device", "backend"] {
            if model.contains_key(key) {
                problems.push(format!(
                    "model.{key}: cannot be set by a job's sidecar, only in the daemon's config"
                ));
            }
        }
    }
    problems.extend(resolve_styles(&mut table, root, true));
    if problems.is_empty() {
        Ok(table)
    } else {
        Err(format!("{name}:\n  {}", problems.join("\n  ")))
    }
}
