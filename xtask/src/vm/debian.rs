//! Debian packages for the guests, fetched with apt-get and unpacked once
//! into the cache: kernels (image and modules) and busybox-static.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Written into an unpacked package's directory once it is complete.
const UNPACKED_STAMP: &str = ".unpacked";

/// A Debian kernel, unpacked.
pub struct Kernel {
    /// Its `uname -r`, e.g. `6.1.0-56-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// apt-get and apt-cache, with a cache directory of unpacked packages.
pub struct Apt {
    cache: PathBuf,
    updated: bool,
    /// `-o` options of a private package index (another Debian release's),
    /// so the host's own sources and installed packages stay untouched.
    options: Vec<String>,
}

/// The candidate version of a package and what it depends on.
struct Candidate {
    version: String,
    depends: Vec<String>,
}

impl Apt {
    pub fn new(cache: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        Ok(Self {
            cache,
            updated: false,
            options: Vec::new(),
        })
    }

    /// Packages of another Debian release (e.g. "bullseye"), from an index
    /// of their own under `dir`: apt reads only the sources written there.
    pub fn release(cache: PathBuf, dir: &Path, release: &str) -> anyhow::Result<Self> {
        let mut apt = Self::new(cache)?;
        let lists = dir.join("lists");
        let archives = dir.join("cache/archives");
        for needed in [
            lists.join("partial"),
            archives.join("partial"),
            dir.join("parts"),
        ] {
            fs::create_dir_all(&needed)
                .with_context(|| format!("creating {}", needed.display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb http://deb.debian.org/debian {release} main\n\
                 deb http://deb.debian.org/debian-security {release}-security main\n"
            ),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("writing {}", status.display()))?;
        }
        let option = |name: &str, path: &Path| format!("{name}={}", path.display());
        apt.options = [
            option("Dir::Etc::SourceList", &sources),
            option("Dir::Etc::SourceParts", &dir.join("parts")),
            option("Dir::State::Lists", &lists),
            option("Dir::Cache", &dir.join("cache")),
            option("Dir::State::status", &status),
        ]
        .into_iter()
        .flat_map(|value| ["-o".to_owned(), value])
        .collect();
        Ok(apt)
    }

    /// The kernel `meta_package` currently depends on, which must belong to
    /// `series` (e.g. "6.1"), unpacked.
    pub fn kernel(&mut self, meta_package: &str, series: &str) -> anyhow::Result<Kernel> {
        let meta = self.candidate(meta_package)?;
        let package = meta
            .depends
            .iter()
            .find(|name| name.starts_with("linux-image-"))
            .with_context(|| format!("{meta_package} depends on no linux-image package"))?;
        // linux-image-6.1.0-56-amd64 or linux-image-6.12.117+deb12-amd64
        if !package.starts_with(&format!("linux-image-{series}.")) {
            bail!("{meta_package} now depends on {package}, not a {series} kernel");
        }
        let dir = self.unpacked(package)?;
        let release = package.trim_start_matches("linux-image-");
        let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
        let modules = dir.join("lib/modules").join(release);
        if !vmlinuz.is_file() || !modules.is_dir() {
            bail!(
                "{package} has no boot/vmlinuz-{release} or lib/modules/{release} (in {})",
                dir.display()
            );
        }
        Ok(Kernel {
            release: release.to_owned(),
            vmlinuz,
            modules,
        })
    }

    /// The directory where the candidate version of `package` is unpacked,
    /// downloading and unpacking it unless the cache has it.
    pub fn unpacked(&mut self, package: &str) -> anyhow::Result<PathBuf> {
        let version = self.candidate(package)?.version;
        let name = format!("{package}_{}", version.replace(':', "%3a"));
        let dir = self.cache.join(&name);
        if dir.join(UNPACKED_STAMP).exists() {
            println!("{package} {version}: cached in {}", dir.display());
            return Ok(dir);
        }
        let download = self.cache.join("download");
        let partial = self.cache.join(format!("{name}.partial"));
        for stale in [&download, &partial, &dir] {
            if stale.exists() {
                fs::remove_dir_all(stale)
                    .with_context(|| format!("removing {}", stale.display()))?;
            }
        }
        fs::create_dir_all(&download)
            .with_context(|| format!("creating {}", download.display()))?;
        let mut get = Command::new("apt-get");
        get.current_dir(&download)
            .args(&self.options)
            // apt's download sandbox user cannot write into the cache.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}={version}"));
        cmd::run(&mut get).with_context(|| format!("downloading {package} {version}"))?;
        let deb = only_deb(&download)?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::write(
            partial.join(UNPACKED_STAMP),
            format!("{package} {version}\n"),
        )?;
        fs::rename(&partial, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
        fs::remove_dir_all(&download)
            .with_context(|| format!("removing {}", download.display()))?;
        Ok(dir)
    }

    /// `apt-cache show` of the version apt would install. A fresh machine
    /// may have no package lists yet: then update them once and ask again.
    fn candidate(&mut self, package: &str) -> anyhow::Result<Candidate> {
        let mut show = Command::new("apt-cache");
        show.args(&self.options)
            .args(["show", "--no-all-versions", package]);
        let mut record = cmd::output(&mut show);
        if record.is_none() && !self.updated {
            self.updated = true;
            cmd::run(
                Command::new("apt-get")
                    .args(&self.options)
                    .args(["-q", "update"]),
            )?;
            record = cmd::output(&mut show);
        }
        let record = record.with_context(|| format!("apt knows no package {package}"))?;
        parse_candidate(&record).with_context(|| format!("reading `apt-cache show {package}`"))
    }
}

fn parse_candidate(record: &str) -> anyhow::Result<Candidate> {
    let field = |name: &str| {
        record
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
    };
    let version = field("Version").context("no Version field")?.to_owned();
    // "a (= 1), b | c": the first alternative of each, without versions.
    let depends = field("Depends")
        .unwrap_or_default()
        .split(',')
        .filter_map(|item| item.split('|').next()?.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    Ok(Candidate { version, depends })
}

fn only_deb(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut debs = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            debs.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(debs) {
        Ok([deb]) => Ok(deb),
        Err(debs) => bail!(
            "expected one .deb in {}, found {}",
            dir.display(),
            debs.len()
        ),
    }
}

/// A kernel module ready to be put into the initramfs.
pub struct Module {
    pub name: String,
    /// The uncompressed ELF object, for busybox's insmod.
    pub object: Vec<u8>,
}

/// The modules that provide `wanted`, dependencies first. Modules built into
/// the kernel are left out; a name in `optional` that the kernel lacks is
/// skipped.
pub fn modules(kernel: &Kernel, wanted: &[&str], optional: &[&str]) -> anyhow::Result<Vec<Module>> {
    let builtin_list = kernel.modules.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_list)
        .with_context(|| format!("reading {}", builtin_list.display()))?
        .lines()
        .filter_map(module_name)
        .collect();
    let mut files = HashMap::new();
    index_modules(&kernel.modules.join("kernel"), &mut files)?;

    let mut ordered = Vec::new();
    let mut seen = BTreeSet::new();
    let names = wanted
        .iter()
        .chain(optional)
        .map(|name| name.replace('-', "_"));
    for name in names {
        let lacking = !builtin.contains(&name) && !files.contains_key(&name);
        if lacking && optional.iter().any(|o| o.replace('-', "_") == name) {
            continue;
        }
        add_module(&name, &builtin, &files, &mut seen, &mut ordered)?;
    }
    Ok(ordered)
}

/// Adds `name` after its dependencies (depth first).
fn add_module(
    name: &str,
    builtin: &BTreeSet<String>,
    files: &HashMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    ordered: &mut Vec<Module>,
) -> anyhow::Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = files
        .get(name)
        .with_context(|| format!("the kernel has no module {name}"))?;
    let object = read_module(path)?;
    let depends = modinfo_depends(&object)
        .with_context(|| format!("reading the dependencies of {}", path.display()))?;
    for dependency in depends {
        add_module(&dependency, builtin, files, seen, ordered)?;
    }
    ordered.push(Module {
        name: name.to_owned(),
        object,
    });
    Ok(())
}

/// "kernel/fs/9p/9p.ko.xz" -> "9p"; module names use `_` where files may use `-`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next()?;
    (file.len() > stem.len()).then(|| stem.replace('-', "_"))
}

fn index_modules(dir: &Path, files: &mut HashMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = path.to_str().and_then(module_name) {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// Newer Debian kernels ship xz-compressed modules, which busybox's insmod
/// cannot load.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let mut decompress = Command::new(decompressor);
    decompress.arg("-dc").arg(path);
    let out = decompress
        .output()
        .with_context(|| format!("running `{}`", cmd::show(&decompress)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", cmd::show(&decompress), out.status);
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section: the modules the
/// kernel needs loaded first (what depmod would put in modules.dep).
fn modinfo_depends(elf: &[u8]) -> anyhow::Result<Vec<String>> {
    let modinfo = elf_section(elf, ".modinfo").context("no .modinfo section")?;
    let depends = modinfo
        .split(|&byte| byte == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(depends)
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect())
}

/// The contents of the section called `wanted` in a 64-bit little-endian ELF
/// file (the only kind an amd64 kernel loads).
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let section_headers = le(elf, 0x28, 8)?;
    let header_size = le(elf, 0x3a, 2)?;
    let count = le(elf, 0x3c, 2)?;
    let names_index = le(elf, 0x3e, 2)?;
    // (name offset, file offset, size) of section `index`.
    let header = |index: usize| {
        let at = section_headers.checked_add(index.checked_mul(header_size)?)?;
        Some((le(elf, at, 4)?, le(elf, at + 24, 8)?, le(elf, at + 32, 8)?))
    };
    let (_, names_offset, _) = header(names_index)?;
    (0..count).find_map(|index| {
        let (name, offset, size) = header(index)?;
        let name_bytes = elf.get(names_offset.checked_add(name)?..)?;
        let name_end = name_bytes.iter().position(|&byte| byte == 0)?;
        (&name_bytes[..name_end] == wanted.as_bytes())
            .then(|| elf.get(offset..offset.checked_add(size)?))
            .flatten()
    })
}

/// The little-endian unsigned number of `len` bytes at `at`.
fn le(bytes: &[u8], at: usize, len: usize) -> Option<usize> {
    let field = bytes.get(at..at.checked_add(len)?)?;
    let value = field
        .iter()
        .rev()
        .fold(0u64, |value, &byte| value << 8 | u64::from(byte));
    usize::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_candidate_and_its_dependencies() {
        let record = "Package: linux-image-amd64\nVersion: 6.1.192-2\n\
                      Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2), a | b\n";
        let candidate = parse_candidate(record).unwrap();
        assert_eq!(candidate.version, "6.1.192-2");
        assert_eq!(candidate.depends, ["linux-image-6.1.0-56-amd64", "a"]);
    }

    #[test]
    fn names_modules_like_the_kernel() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz").as_deref(), Some("9p"));
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci-x.ko").as_deref(),
            Some("virtio_pci_x")
        );
        assert_eq!(module_name("modules.order"), None);
    }

    /// A minimal ELF with a section-name table and one `.modinfo` section.
    #[test]
    fn finds_module_dependencies_in_modinfo() {
        let names = b"\0.shstrtab\0.modinfo\0";
        let modinfo = b"license=GPL\0depends=netfs,9pnet\0name=9p\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_at = elf.len();
        elf.extend_from_slice(names);
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let headers_at = elf.len();
        let mut header = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        header(0, 0, 0);
        header(1, names_at, names.len());
        header(11, modinfo_at, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(headers_at as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(modinfo_depends(&elf).unwrap(), ["netfs", "9pnet"]);
    }
}
