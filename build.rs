//! Compiles every `kernels/*.cu` to a fatbin with nvcc and embeds them in the crate.
//!
//! - nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`,
//!   `/usr/local/cuda/bin`, and the cache of `scripts/install-cuda-toolchain.sh`.
//! - Each fatbin holds SASS for every architecture in `METAKERNELS_CUDA_ARCHS` (default
//!   `80,90`) plus PTX of the newest, so newer GPUs JIT-compile it.
//! - Fatbins are compressed (`--compress-mode=size`); the driver decompresses them on load.
//! - The ptxas report (`-Xptxas -v`: registers, shared memory, spills) is kept beside each
//!   fatbin as `<name>.ptxas.txt` in OUT_DIR; a kernel that spills is a `cargo:warning`.
//! - Without nvcc the crate builds CPU-only with one warning, unless
//!   `METAKERNELS_REQUIRE_KERNELS=1`, which makes a missing nvcc or a failing kernel an error.
//! - `METAKERNELS_KERNEL_REPORT_DIR=<dir>` also copies every report and fatbin there.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "METAKERNELS_CUDA_ARCHS",
        "METAKERNELS_REQUIRE_KERNELS",
        "METAKERNELS_CUDA_CACHE",
        "METAKERNELS_KERNEL_REPORT_DIR",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("METAKERNELS_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let modules = if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        Vec::new()
    } else {
        build_kernels(&out_dir, require)
    };
    write_index(&out_dir, &modules);
}

/// Compiles all kernels; returns the names of the modules built (empty when nvcc is absent).
fn build_kernels(out_dir: &Path, require: bool) -> Vec<String> {
    let sources = kernel_sources();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    let Some((nvcc, nvcc_version)) = find_nvcc() else {
        let msg = "nvcc not found: building metakernels without CUDA kernels (CPU only). \
                   Run scripts/install-cuda-toolchain.sh or set NVCC / CUDA_HOME to build them.";
        if require {
            panic!("METAKERNELS_REQUIRE_KERNELS=1 but {msg}");
        }
        println!("cargo:warning={msg}");
        return Vec::new();
    };
    let archs = cuda_archs();
    let headers = headers_digest();
    // nvcc is single-threaded per file: compile the files in parallel.
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let toolchain = (nvcc.as_path(), nvcc_version.as_str(), headers);
                let archs = &archs;
                scope.spawn(move || {
                    let name = module_name(src);
                    let result = compile_unless_current(toolchain, src, out_dir, &name, archs);
                    (name, result)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("nvcc thread panicked")).collect()
    });

    let report_dir = env::var_os("METAKERNELS_KERNEL_REPORT_DIR").map(PathBuf::from);
    let mut built = Vec::new();
    let mut failures = Vec::new();
    for (name, result) in results {
        match result {
            Ok(report) => {
                for kernel in spilling_kernels(&report) {
                    println!("cargo:warning=kernel `{kernel}` in kernels/{name}.cu spills registers (see {name}.ptxas.txt)");
                }
                if let Some(dir) = &report_dir {
                    copy_report(dir, out_dir, &name);
                }
                built.push(name);
            }
            Err(message) => failures.push(format!("kernels/{name}.cu failed to compile:\n{message}")),
        }
    }
    if !failures.is_empty() {
        let all = failures.join("\n");
        if require {
            panic!("METAKERNELS_REQUIRE_KERNELS=1 and {all}");
        }
        for line in all.lines().take(40) {
            println!("cargo:warning={line}");
        }
        // A partial set of kernels would make some ops fail at run time on a GPU: build none.
        return Vec::new();
    }
    built
}

fn kernel_sources() -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    sources
}

fn module_name(src: &Path) -> String {
    src.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The first working nvcc and its `--version` text.
fn find_nvcc() -> Option<(PathBuf, String)> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    candidates.extend(toolchain_cache_nvcc());
    candidates.into_iter().find_map(|p| {
        let output = Command::new(&p).arg("--version").output().ok().filter(|o| o.status.success())?;
        Some((p, String::from_utf8_lossy(&output.stdout).into_owned()))
    })
}

/// Where scripts/install-cuda-toolchain.sh puts nvcc (the pip wheels' layout).
fn toolchain_cache_nvcc() -> Vec<PathBuf> {
    let cache = env::var_os("METAKERNELS_CUDA_CACHE").map(PathBuf::from).or_else(|| {
        let base = env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("metakernels/cuda-13.0"))
    });
    let Some(cache) = cache else { return Vec::new() };
    let lib = cache.join("venv/lib");
    let pythons =
        fs::read_dir(&lib).map(|d| d.filter_map(|e| e.ok()).collect::<Vec<_>>()).unwrap_or_default();
    pythons
        .into_iter()
        .flat_map(|py| {
            let nvidia = py.path().join("site-packages/nvidia");
            [nvidia.join("cu13/bin/nvcc"), nvidia.join("cuda_nvcc/bin/nvcc")]
        })
        .collect()
}

fn cuda_archs() -> Vec<String> {
    env::var("METAKERNELS_CUDA_ARCHS")
        .unwrap_or_else(|_| "80,90".into())
        .split(',')
        .map(|a| a.trim().trim_start_matches("sm_").to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// Compiles `src` to `<name>.fatbin` in `out_dir` and writes its ptxas report beside it, unless
/// both are there from a build with the same nvcc, arguments, source and headers: cargo reruns
/// this script for any change under kernels/, and recompiling every family for an edit to one
/// costs minutes. Returns the ptxas report, or nvcc's full output on failure.
fn compile_unless_current(
    (nvcc, nvcc_version, headers): (&Path, &str, u64),
    src: &Path,
    out_dir: &Path,
    name: &str,
    archs: &[String],
) -> Result<String, String> {
    let fatbin = out_dir.join(format!("{name}.fatbin"));
    let report_path = out_dir.join(format!("{name}.ptxas.txt"));
    let stamp_path = out_dir.join(format!("{name}.stamp"));
    let args = nvcc_args(src, &fatbin, archs);
    let source = fs::read(src).map_err(|e| format!("could not read {}: {e}", src.display()))?;
    let stamp = format!("{}\n{nvcc_version}\n{args:?}\n{:x}\n", nvcc.display(), digest(&[&source]) ^ headers);
    if fatbin.exists() && fs::read_to_string(&stamp_path).is_ok_and(|old| old == stamp) {
        if let Ok(report) = fs::read_to_string(&report_path) {
            return Ok(report);
        }
    }
    let _ = fs::remove_file(&stamp_path);
    let output = Command::new(nvcc)
        .args(&args)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let text =
        String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(text);
    }
    fs::write(&report_path, &text).map_err(|e| format!("could not write {}: {e}", report_path.display()))?;
    fs::write(&stamp_path, stamp).map_err(|e| format!("could not write {}: {e}", stamp_path.display()))?;
    Ok(text)
}

/// nvcc's command line for one kernel file.
fn nvcc_args(src: &Path, out: &Path, archs: &[String]) -> Vec<String> {
    let mut args: Vec<String> =
        ["-fatbin", "-O3", "-lineinfo", "-std=c++17", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
            .map(String::from)
            .to_vec();
    // Every test and bench binary embeds every fatbin: compressing for size shrinks them about
    // 8x (29 MB → under 4 MB), which keeps the GPU bundle under its 64 MiB limit. The driver
    // decompresses at module load (once per module and process).
    args.push("--compress-mode=size".into());
    for arch in archs {
        args.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    if let Some(newest) = archs
        .iter()
        .max_by_key(|a| a.trim_end_matches(|c: char| c.is_alphabetic()).parse::<u32>().unwrap_or(0))
    {
        args.push(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
    }
    args.extend(["-Ikernels".into(), "-o".into(), out.display().to_string(), src.display().to_string()]);
    args
}

/// A digest of every header in kernels/ (any .cu may include any of them).
fn headers_digest() -> u64 {
    let mut headers: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    headers.retain(|p| p.extension().is_some_and(|e| e == "cuh" || e == "h"));
    headers.sort();
    let contents: Vec<Vec<u8>> = headers
        .iter()
        .map(|h| [h.display().to_string().into_bytes(), fs::read(h).unwrap_or_default()].concat())
        .collect();
    digest(&contents.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

/// FNV-1a over the parts: stable across Rust versions, unlike std's hasher.
fn digest(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in part.iter().chain(&[0xffu8]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Kernels whose ptxas report shows nonzero spill stores or loads.
fn spilling_kernels(report: &str) -> Vec<String> {
    let mut current = String::new();
    let mut spilling = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = rest.trim().to_string();
        }
        let spills = line.contains("bytes spill stores")
            && !line.contains(" 0 bytes spill stores, 0 bytes spill loads");
        if spills && !spilling.contains(&current) {
            spilling.push(current.clone());
        }
    }
    spilling
}

fn copy_report(dir: &Path, out_dir: &Path, name: &str) {
    let _ = fs::create_dir_all(dir);
    for ext in ["fatbin", "ptxas.txt"] {
        let file = format!("{name}.{ext}");
        let _ = fs::copy(out_dir.join(&file), dir.join(&file));
    }
}

/// Writes `kernels.rs`: the table of embedded fatbins that src/cuda/mod.rs includes.
fn write_index(out_dir: &Path, modules: &[String]) {
    let mut index = String::new();
    writeln!(index, "/// Whether the CUDA kernels were compiled into this build.").unwrap();
    writeln!(index, "pub(crate) const KERNELS_BUILT: bool = {};", !modules.is_empty()).unwrap();
    writeln!(index, "/// (module name, fatbin) for every `kernels/*.cu`.").unwrap();
    writeln!(index, "pub(crate) static FATBINS: &[(&str, &[u8])] = &[").unwrap();
    for name in modules {
        writeln!(index, "    ({name:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.fatbin\"))),")
            .unwrap();
    }
    writeln!(index, "];").unwrap();
    fs::write(out_dir.join("kernels.rs"), index).expect("write kernels.rs");
}
