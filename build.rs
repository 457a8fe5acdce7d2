//! With the `cuda` feature: compiles `src/model/cuda/kernels.cu` to PTX with nvcc (embedded in
//! the binary by `src/model/cuda/mod.rs`), and, where ptxas is at hand, assembles that PTX for
//! the target GPU so that a kernel that does not assemble fails the build here rather than at
//! run time on the GPU. Without the feature it does nothing.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (default 90): a driver JIT-compiles it for that architecture
//! and any later one. deploy/cuda-build.sh sets all of this up from PyPI wheels.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &str = "src/model/cuda/kernels.cu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={KERNELS}");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cuda_home = std::env::var_os("CUDA_HOME")
        .or_else(|| std::env::var_os("CUDA_PATH"))
        .map(PathBuf::from);
    let tool = |name: &str| -> PathBuf {
        match &cuda_home {
            Some(home) if home.join("bin").join(name).exists() => home.join("bin").join(name),
            _ => PathBuf::from(name),
        }
    };
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("nvcc"));
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_end_matches(['a', 'f']).replace('.', ""))
        .and_then(|c| c.parse().ok())
        .unwrap_or(90);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let ptx = out.join("distillery_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(KERNELS)
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): the cuda feature needs nvcc; set CUDA_HOME or NVCC, \
                 or build with deploy/cuda-build.sh",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed to compile {KERNELS}");
    // A check only: the driver JIT-compiles the PTX itself at run time.
    let ptxas = tool("ptxas");
    match Command::new(&ptxas)
        .arg(format!("-arch=sm_{cap}"))
        .arg(&ptx)
        .arg("-o")
        .arg(out.join("distillery_kernels.cubin"))
        .status()
    {
        Ok(s) => assert!(
            s.success(),
            "ptxas failed to assemble {KERNELS} for sm_{cap}"
        ),
        Err(e) => println!(
            "cargo:warning=ptxas not run ({e}); {KERNELS} compiled to PTX but not assembled"
        ),
    }
}
