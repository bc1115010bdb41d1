//! What a file name in `inbox/` means: a job's image, its sidecar, or a temp name to ignore.

use std::ffi::{OsStr, OsString};
use std::path::Path;

/// The role of a file dropped into `inbox/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A job: the image to paint (whether it really is an image is found out when it runs).
    Image,
    /// `NAME.toml`: overrides for the job whose image has the stem `NAME`.
    Sidecar,
    /// Being written under a temp name (dotfile, `*.part`, `*.partial`, `*.tmp`, `*~`):
    /// ignored until renamed.
    Temporary,
}

/// The role of `name` (a bare file name, no folder).
pub fn role(name: &OsStr) -> Role {
    let text = name.to_string_lossy();
    let lower = text.to_ascii_lowercase();
    if text.starts_with('.')
        || text.ends_with('~')
        || [".part", ".partial", ".tmp", ".crdownload"].iter().any(|s| lower.ends_with(s))
    {
        Role::Temporary
    } else if lower.ends_with(".toml") {
        Role::Sidecar
    } else {
        Role::Image
    }
}

/// The stem of a file name: `photo.jpg` -> `photo`, `photo` -> `photo`.
pub fn stem(name: &OsStr) -> OsString {
    Path::new(name).file_stem().map(OsStr::to_os_string).unwrap_or_else(|| name.to_os_string())
}

/// The sidecar that belongs to an image: `photo.jpg` -> `photo.toml`.
pub fn sidecar_of(image: &OsStr) -> OsString {
    let mut name = stem(image);
    name.push(".toml");
    name
}

/// `name` with `-N` before its extension when `n > 1`: (`photo.jpg`, 2) -> `photo-2.jpg`.
/// Results of same-named drops get successive numbers instead of overwriting each other.
pub fn numbered(name: &OsStr, n: u32) -> OsString {
    if n <= 1 {
        return name.to_os_string();
    }
    let path = Path::new(name);
    let mut out = stem(name);
    out.push(format!("-{n}"));
    if let Some(ext) = path.extension() {
        out.push(".");
        out.push(ext);
    }
    out
}

/// The most bytes in one file name on the filesystems easel runs on (ext4, XFS, btrfs, tmpfs).
pub const NAME_MAX: usize = 255;
/// A longer "extension" is taken as part of the stem when a name must be shortened.
const MAX_EXTENSION: usize = 16;

/// `name` as stem and extension with its dot: `photo.jpg` -> (`photo`, `.jpg`).
fn split_extension(name: &OsStr) -> (OsString, OsString) {
    let path = Path::new(name);
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) if ext.len() <= MAX_EXTENSION => {
            let mut dot_ext = OsString::from(".");
            dot_ext.push(ext);
            (stem.to_os_string(), dot_ext)
        }
        _ => (name.to_os_string(), OsString::new()),
    }
}

/// `text` cut to at most `max` bytes; a UTF-8 name is cut between characters.
pub fn truncate(text: &OsStr, max: usize) -> OsString {
    if text.len() <= max {
        return text.to_os_string();
    }
    match text.to_str() {
        Some(s) => {
            let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            OsString::from(&s[..end])
        }
        #[cfg(unix)]
        None => {
            use std::os::unix::ffi::{OsStrExt, OsStringExt};
            OsString::from_vec(text.as_bytes()[..max].to_vec())
        }
        #[cfg(not(unix))]
        None => OsString::from(truncate(OsStr::new(&text.to_string_lossy().into_owned()), max)),
    }
}

/// Names for files that go into one folder together, numbered `n` (see [`numbered`]) and
/// shortened so that every name, with the `follower` given beside it appended (e.g. `.error.txt`
/// for the file that explains it), fits in [`NAME_MAX`] bytes. The stems are cut, all at the
/// same length, and the extensions kept: (`photo.jpg`, `photo.toml`) stay a pair. Uniqueness
/// comes from `n`: the caller picks the first `n` whose names are all free.
pub fn numbered_fit(names: &[(&OsStr, &str)], n: u32) -> Vec<OsString> {
    let tag = if n > 1 { format!("-{n}") } else { String::new() };
    let parts: Vec<(OsString, OsString)> = names
        .iter()
        .map(|(name, _)| {
            let (stem, ext) = split_extension(name);
            let mut tail = OsString::from(&tag);
            tail.push(&ext);
            (stem, tail)
        })
        .collect();
    let need = names
        .iter()
        .zip(&parts)
        .map(|((_, follower), (_, tail))| tail.len() + follower.len())
        .max()
        .unwrap_or(0);
    let room = NAME_MAX.saturating_sub(need).max(1);
    parts
        .into_iter()
        .map(|(stem, tail)| {
            let mut name = truncate(&stem, room);
            name.push(tail);
            name
        })
        .collect()
}

/// `stem` (already numbered) with the extension `ext`: (`photo-2`, `png`) -> `photo-2.png`.
pub fn with_extension(stem: &OsStr, ext: &str) -> OsString {
    let mut out = stem.to_os_string();
    out.push(".");
    out.push(ext);
    out
}

/// The file name for logs and status: lossless for UTF-8, with U+FFFD for other bytes.
pub fn lossy(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> Role {
        role(OsStr::new(name))
    }

    #[test]
    fn temp_names_are_ignored_until_renamed() {
        for name in
            [".photo.jpg", "photo.jpg.part", "photo.JPG.PARTIAL", "photo.tmp", "photo.jpg~", ".x.toml"]
        {
            assert_eq!(r(name), Role::Temporary, "{name}");
        }
        assert_eq!(r("photo.jpg"), Role::Image);
        assert_eq!(r("my phöto 1.png"), Role::Image);
        assert_eq!(r("notes.txt"), Role::Image, "anything else is a job, and fails if it is no image");
        assert_eq!(r("photo.toml"), Role::Sidecar);
    }

    #[test]
    fn sidecars_and_numbered_names() {
        assert_eq!(sidecar_of(OsStr::new("a b.jpeg")), "a b.toml");
        assert_eq!(sidecar_of(OsStr::new("noext")), "noext.toml");
        assert_eq!(numbered(OsStr::new("photo.jpg"), 1), "photo.jpg");
        assert_eq!(numbered(OsStr::new("photo.jpg"), 3), "photo-3.jpg");
        assert_eq!(numbered(OsStr::new("photo"), 2), "photo-2");
        assert_eq!(with_extension(&numbered(OsStr::new("ü.jpg"), 2), "png"), "ü-2.jpg.png");
        assert_eq!(with_extension(&stem(&numbered(OsStr::new("ü.jpg"), 2)), "png"), "ü-2.png");
    }

    #[test]
    fn derived_names_fit_in_255_bytes_keeping_extensions_and_pairs() {
        let fit = |names: &[(&str, &str)], n| -> Vec<String> {
            let names: Vec<(&OsStr, &str)> = names.iter().map(|(a, f)| (OsStr::new(*a), *f)).collect();
            numbered_fit(&names, n).into_iter().map(|s| s.into_string().unwrap()).collect()
        };
        // Short names are only numbered.
        assert_eq!(fit(&[("a b.jpg", ""), ("a b.toml", "")], 3), ["a b-3.jpg", "a b-3.toml"]);
        assert_eq!(fit(&[("photo.png", ".error.txt")], 1), ["photo.png"]);
        // 250 bytes + .png.error.txt: the stem is cut, the extension kept.
        let long = format!("{}.png", "M".repeat(246));
        let got = fit(&[(long.as_str(), ".error.txt")], 1);
        assert_eq!(got[0].len() + ".error.txt".len(), NAME_MAX);
        assert!(got[0].ends_with("M.png"));
        // A 255-byte name numbered: shorter, distinct from the first, still .png.
        let full = format!("{}.png", "x".repeat(251));
        let (one, two) = (fit(&[(full.as_str(), "")], 1), fit(&[(full.as_str(), "")], 2));
        assert_eq!(one[0], full);
        assert_eq!(two[0].len(), NAME_MAX);
        assert!(two[0].ends_with("-2.png") && two[0] != one[0]);
        // A pair is cut at one length, so image and sidecar keep one stem.
        let img = format!("{}.jpeg", "é".repeat(125));
        let side = format!("{}.toml", "é".repeat(125));
        let pair = fit(&[(img.as_str(), ""), (side.as_str(), "")], 12);
        assert!(pair.iter().all(|n| n.len() <= NAME_MAX), "{pair:?}");
        assert_eq!(pair[0].trim_end_matches(".jpeg"), pair[1].trim_end_matches(".toml"));
        assert!(pair[0].ends_with("é-12.jpeg"), "cut between characters: {}", pair[0]);
    }
}
