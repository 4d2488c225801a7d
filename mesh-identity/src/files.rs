//! Reading and writing CA files (crate-private): PEM certificates, private keys with
//! mode 0600 written atomically, CA directories with mode 0700.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rustls_pki_types::{CertificateDer, pem::PemObject as _};

/// Mode of private key files: readable by their owner only.
pub(crate) const KEY_MODE: u32 = 0o600;

/// Mode of certificate files: public material.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Mode of a CA directory this crate creates: it holds private keys.
const DIR_MODE: u32 = 0o700;

/// A CA file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A system call on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// A file that should hold PEM certificates does not.
    #[error("{}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        why: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and its parents) with mode 0700 when missing. An existing directory is
/// left as it is: it may be shared (`/etc/mesh`), and changing its mode is the
/// operator's decision.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_error(dir))
}

/// Replaces `path` with `contents`, created with `mode`, atomically: written to a
/// temporary file beside it, flushed, then renamed over it, so a crash leaves the old
/// file or the new one, never a torn key, and the key never exists with a wider mode.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        // A stale temporary file of a crashed run with our pid: remove it so create_new
        // (which refuses to follow a planted symlink) can make a fresh one.
        match fs::remove_file(&tmp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        FileError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// The contents of text file `path`.
pub(crate) fn read(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(io_error(path))
}

/// Every certificate of PEM text `pem` (read from `path`, named in errors); at least one.
pub(crate) fn certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| FileError::Pem {
            path: path.to_owned(),
            why: format!("bad PEM: {err}"),
        })?;
    if certs.is_empty() {
        return Err(FileError::Pem {
            path: path.to_owned(),
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// PEM with Unix line endings (the `pem` crate's default is CRLF).
const PEM_CONFIG: pem::EncodeConfig = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

/// PEM text of one block tagged `tag` (`CERTIFICATE`, `PRIVATE KEY`).
pub(crate) fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(tag, der), PEM_CONFIG)
}

/// PEM text of `certs`, in order.
pub(crate) fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|cert| pem_block("CERTIFICATE", cert))
        .collect()
}
