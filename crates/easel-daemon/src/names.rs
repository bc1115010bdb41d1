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
}
