//! Reading TOML option tables with every problem reported at once, each with its key path.
//!
//! serde stops at the first error; users editing a config want to see all of them, so
//! configuration sections and plugin options are read through [`Options`], which records
//! problems and carries on with defaults. A caller checks [`Options::finish`] and discards
//! what was built when it returns any error.

use std::fmt;

use toml::{Table, Value};

use crate::LayerId;

/// One documented option of a plugin, for `easel plugins`.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub key: &'static str,
    /// The accepted values, e.g. `number > 0` or `list of layer names`.
    pub kind: &'static str,
    /// Built from the same constant the plugin's `build` reads, so the value is written once.
    pub default: OptionDefault,
    pub doc: &'static str,
}

/// The value an option takes when a config leaves it out, shown by `easel plugins`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionDefault {
    Number(f64),
    Integer(u64),
    /// One of a fixed set of names.
    Name(&'static str),
    Layers(&'static [LayerId]),
    /// A default computed from other options, in words (`1/n each`).
    Derived(&'static str),
}

impl fmt::Display for OptionDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Debug, not Display: `1e-8` rather than `0.00000001`.
            OptionDefault::Number(x) => write!(f, "{x:?}"),
            OptionDefault::Integer(n) => write!(f, "{n}"),
            OptionDefault::Name(name) => f.write_str(name),
            OptionDefault::Layers(layers) => {
                let names: Vec<String> = layers.iter().map(|l| format!("\"{l}\"")).collect();
                write!(f, "[{}]", names.join(", "))
            }
            OptionDefault::Derived(words) => f.write_str(words),
        }
    }
}

/// A problem with one key: `loss[1].weight: must be > 0, got -3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A reader over one TOML table that records problems instead of stopping at them.
pub struct Options<'a> {
    table: &'a Table,
    path: String,
    /// Keys present in the table and read.
    read: Vec<&'a str>,
    /// Every key asked for, present or not: what an unknown key is compared with.
    asked: Vec<String>,
    errors: Vec<OptionError>,
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("number {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("date {d}"),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Float(x) => Some(*x),
        Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

impl<'a> Options<'a> {
    /// Reads `table`, whose keys are reported under `path` (`loss[1]`, `run`, or `` for the top).
    pub fn new(table: &'a Table, path: impl Into<String>) -> Self {
        Self { table, path: path.into(), read: Vec::new(), asked: Vec::new(), errors: Vec::new() }
    }

    /// The full path of `key` in this table.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Records a problem with `key`.
    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        let path = self.key_path(key);
        self.errors.push(OptionError { path, message: message.into() });
    }

    /// Whether any problem has been recorded so far.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Adds the problems found by a reader of a nested table.
    pub fn absorb(&mut self, errors: Vec<OptionError>) {
        self.errors.extend(errors);
    }

    /// The raw value of `key`, marking it as known.
    pub fn value(&mut self, key: &str) -> Option<&'a Value> {
        if !self.asked.iter().any(|k| k == key) {
            self.asked.push(key.to_string());
        }
        let (k, v) = self.table.get_key_value(key)?;
        self.read.push(k.as_str());
        Some(v)
    }

    /// Marks `key` as known without reading it (keys the caller handles itself).
    pub fn allow(&mut self, key: &str) {
        let _ = self.value(key);
    }

    /// A number checked by `check`, which returns the reason a value is rejected.
    pub fn number(&mut self, key: &str, default: f64, check: impl Fn(f64) -> Option<String>) -> f64 {
        let Some(value) = self.value(key) else { return default };
        match as_f64(value) {
            Some(x) if !x.is_finite() => {
                self.error(key, format!("must be a finite number, got {x}"));
                default
            }
            Some(x) => match check(x) {
                Some(reason) => {
                    self.error(key, format!("{reason}, got {x}"));
                    default
                }
                None => x,
            },
            None => {
                self.error(key, format!("expected a number, got {}", describe(value)));
                default
            }
        }
    }

    /// A number > 0.
    pub fn positive(&mut self, key: &str, default: f64) -> f64 {
        self.number(key, default, |x| (x <= 0.0).then(|| "must be > 0".to_string()))
    }

    /// A number >= 0.
    pub fn non_negative(&mut self, key: &str, default: f64) -> f64 {
        self.number(key, default, |x| (x < 0.0).then(|| "must be >= 0".to_string()))
    }

    /// A number in `[low, high]`, or in `[low, high)` when `open_high`.
    pub fn number_in(&mut self, key: &str, default: f64, low: f64, high: f64, open_high: bool) -> f64 {
        self.number(key, default, |x| {
            let above = if open_high { x >= high } else { x > high };
            (x < low || above).then(|| {
                let close = if open_high { ")" } else { "]" };
                format!("must be in [{low}, {high}{close}")
            })
        })
    }

    /// An integer in `[min, max]`.
    pub fn integer(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(value) = self.value(key) else { return default };
        match value {
            Value::Integer(i) if *i >= min as i64 && (*i as u64) <= max => *i as u64,
            Value::Integer(i) => {
                self.error(key, format!("must be in [{min}, {max}], got {i}"));
                default
            }
            other => {
                self.error(key, format!("expected an integer, got {}", describe(other)));
                default
            }
        }
    }

    /// A boolean.
    pub fn boolean(&mut self, key: &str, default: bool) -> bool {
        let Some(value) = self.value(key) else { return default };
        match value {
            Value::Boolean(b) => *b,
            other => {
                self.error(key, format!("expected true or false, got {}", describe(other)));
                default
            }
        }
    }

    /// A string, if present.
    pub fn string(&mut self, key: &str) -> Option<&'a str> {
        let value = self.value(key)?;
        match value {
            Value::String(s) => Some(s.as_str()),
            other => {
                self.error(key, format!("expected a string, got {}", describe(other)));
                None
            }
        }
    }

    /// One of a fixed set of names.
    pub fn choice<T: Copy>(&mut self, key: &str, default: T, choices: &[(&str, T)]) -> T {
        let Some(name) = self.string(key) else { return default };
        match choices.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.error(key, format!("unknown value \"{name}\"; expected one of: {}", names.join(", ")));
                default
            }
        }
    }

    /// An array of values, if present; `None` (with an error) when the key is not an array.
    pub fn array(&mut self, key: &str) -> Option<&'a [Value]> {
        let value = self.value(key)?;
        match value {
            Value::Array(items) => Some(items.as_slice()),
            other => {
                self.error(key, format!("expected an array, got {}", describe(other)));
                None
            }
        }
    }

    /// A non-empty list of distinct layer names.
    pub fn layers(&mut self, key: &str, default: &[LayerId]) -> Vec<LayerId> {
        let Some(items) = self.array(key) else { return default.to_vec() };
        let mut layers = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            match item {
                Value::String(name) => match name.parse::<LayerId>() {
                    Ok(layer) if layers.contains(&layer) => {
                        self.error(&item_key, format!("layer `{layer}` is listed twice"))
                    }
                    Ok(layer) => layers.push(layer),
                    Err(e) => self.error(&item_key, e.to_string()),
                },
                other => self.error(&item_key, format!("expected a layer name, got {}", describe(other))),
            }
        }
        if items.is_empty() {
            self.error(key, "must name at least one layer");
        }
        layers
    }

    /// A list of numbers, each checked like [`Options::number`].
    pub fn numbers(&mut self, key: &str, check: impl Fn(f64) -> Option<String>) -> Option<Vec<f64>> {
        let items = self.array(key)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            match as_f64(item) {
                Some(x) if !x.is_finite() => {
                    self.error(&item_key, format!("must be a finite number, got {x}"))
                }
                Some(x) => match check(x) {
                    Some(reason) => self.error(&item_key, format!("{reason}, got {x}")),
                    None => out.push(x),
                },
                None => self.error(&item_key, format!("expected a number, got {}", describe(item))),
            }
        }
        Some(out)
    }

    /// A nested table, if present.
    pub fn table(&mut self, key: &str) -> Option<&'a Table> {
        let value = self.value(key)?;
        match value {
            Value::Table(t) => Some(t),
            other => {
                self.error(key, format!("expected a table, got {}", describe(other)));
                None
            }
        }
    }

    /// An array of tables (`[[key]]`), if present.
    pub fn tables(&mut self, key: &str) -> Option<Vec<&'a Table>> {
        let items = self.array(key)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Table(t) => out.push(t),
                other => {
                    self.error(&format!("{key}[{i}]"), format!("expected a table, got {}", describe(other)))
                }
            }
        }
        Some(out)
    }

    /// Ends reading: every key never asked for is reported as unknown, with the keys that
    /// were asked for and the closest of them. Returns all problems.
    pub fn finish(mut self) -> Vec<OptionError> {
        let mut known: Vec<&str> = self.asked.iter().map(String::as_str).collect();
        known.sort_unstable();
        for key in self.table.keys() {
            if !self.read.contains(&key.as_str()) {
                let hint = if known.is_empty() {
                    "this table takes no options".to_string()
                } else {
                    let guess =
                        closest(key, &known).map(|k| format!("did you mean `{k}`? ")).unwrap_or_default();
                    format!("{guess}known keys: {}", known.join(", "))
                };
                let path = self.key_path(key);
                self.errors.push(OptionError { path, message: format!("unknown key; {hint}") });
            }
        }
        self.errors
    }
}

/// The candidate a typo most likely meant: the nearest by edit distance, if within a third of
/// the longer word (at least one edit). Ties go to the first in `candidates`.
fn closest<'c>(typo: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (edit_distance(typo, c), *c))
        .filter(|(d, c)| *d <= (typo.chars().count().max(c.chars().count()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // `row[j]`: the distance from the prefix of `a` read so far to `b[..j]`.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().expect("test TOML parses")
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let t = table("weight = -3\nlayers = [\"relu1_1\", \"relu9_9\", 4]\nextra = 1\nflag = \"yes\"");
        let mut o = Options::new(&t, "loss[1]");
        assert_eq!(o.positive("weight", 1.0), 1.0);
        let layers = o.layers("layers", &[]);
        assert_eq!(layers, vec![LayerId::Relu1_1]);
        assert!(!o.boolean("flag", false));
        let errors: Vec<String> = o.finish().iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert_eq!(errors[0], "loss[1].weight: must be > 0, got -3");
        assert!(errors[1].starts_with("loss[1].layers[1]: unknown layer `relu9_9`"));
        assert_eq!(errors[2], "loss[1].layers[2]: expected a layer name, got integer 4");
        assert_eq!(errors[3], "loss[1].flag: expected true or false, got string \"yes\"");
        assert!(errors[4].starts_with("loss[1].extra: unknown key; known keys: flag, layers, weight"));
    }

    #[test]
    fn defaults_are_shown_as_a_config_would_write_them() {
        assert_eq!(OptionDefault::Number(0.02).to_string(), "0.02");
        assert_eq!(OptionDefault::Number(1e-8).to_string(), "1e-8");
        assert_eq!(OptionDefault::Integer(100).to_string(), "100");
        assert_eq!(OptionDefault::Name("strong_wolfe").to_string(), "strong_wolfe");
        let layers = OptionDefault::Layers(&[LayerId::Relu1_1, LayerId::Relu4_2]);
        assert_eq!(layers.to_string(), "[\"relu1_1\", \"relu4_2\"]");
        assert_eq!(OptionDefault::Derived("1/n each").to_string(), "1/n each");
    }

    #[test]
    fn an_unknown_key_lists_every_key_asked_for_and_the_closest() {
        let t = table("lrr = 0.1\nbeta = 0.5\nzzz = 1");
        let mut o = Options::new(&t, "optimizer");
        o.positive("lr", 1.0);
        o.number_in("beta1", 0.9, 0.0, 1.0, true);
        o.number_in("beta2", 0.9, 0.0, 1.0, true);
        let errors: Vec<String> = o.finish().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                // Equally close to both betas: the first in the list.
                "optimizer.beta: unknown key; did you mean `beta1`? known keys: beta1, beta2, lr",
                "optimizer.lrr: unknown key; did you mean `lr`? known keys: beta1, beta2, lr",
                "optimizer.zzz: unknown key; known keys: beta1, beta2, lr",
            ]
        );
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("lr", "lr"), 0);
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("layerz", "layers"), 1);
        assert_eq!(edit_distance("itrations", "iterations"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("sze", &["scales", "seed", "size"]), Some("size"));
        assert_eq!(closest("colour", &["init", "scales", "size"]), None);
    }

    #[test]
    fn accepts_valid_values_and_defaults() {
        let t = table("lr = 2\nhistory = 10\nmode = \"avg\"");
        let mut o = Options::new(&t, "optimizer");
        assert_eq!(o.positive("lr", 1.0), 2.0);
        assert_eq!(o.integer("history", 100, 1, 1000), 10);
        assert_eq!(o.choice("mode", 0, &[("max", 0), ("avg", 1)]), 1);
        assert_eq!(o.non_negative("missing", 0.5), 0.5);
        assert!(o.finish().is_empty());
    }
}
