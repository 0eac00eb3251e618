//! Compiles the c10d shim against the libtorch that tch links (its headers
//! ship in the torch wheel) and gloo's headers (Debian's `libgloo-dev`; the
//! wheel has gloo's code inside libtorch_cpu but not its headers).
//!
//! ProcessGroupNCCL is compiled in (`-DUSE_C10D_NCCL`, cfg `geossl_nccl`) when
//! libtorch has `libtorch_cuda.so` and the venv beside it has the headers it
//! needs: `nccl.h` (the `nvidia-nccl-cu13` wheel torch depends on) and CUDA's
//! runtime headers (`nvidia-cuda-runtime`, `nvidia-cuda-crt`, `nvidia-cuda-cccl`). Without them
//! the build is Gloo-only and asking for NCCL is an error naming why.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo::rustc-check-cfg=cfg(geossl_nccl)");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh");
    let torch = Path::new(&lib).parent().expect("libtorch/lib has a parent");
    let gloo = ["/usr/include/gloo/config.h", "/usr/local/include/gloo/config.h"];
    if !gloo.iter().any(|p| Path::new(p).exists()) {
        panic!("gloo's headers are missing (apt-get install libgloo-dev; scripts/setup.sh does it)");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-interference-size")
        .warnings(false);
    let nccl = nccl_includes(Path::new(&lib));
    match &nccl {
        Ok(dirs) => {
            build.define("USE_C10D_NCCL", None);
            for d in dirs {
                println!("cargo:rerun-if-changed={}", d.display());
                build.include(d);
            }
            println!("cargo:rustc-cfg=geossl_nccl");
        }
        Err(why) => println!("cargo:warning=geossl-dist without NCCL (Gloo only): {why}"),
    }
    build.compile("geossl_c10d_shim");
    // gloo's symbols live in libtorch_cpu, NCCL's group in libtorch_cuda; keep the libraries even if nothing
    // seems to use them yet.
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    let mut libs = vec!["torch", "torch_cpu", "c10"];
    if nccl.is_ok() {
        libs.extend(["torch_cuda", "c10_cuda"]);
    }
    for l in libs {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}

/// The include directories ProcessGroupNCCL.hpp needs, from the wheels installed beside torch
/// (`<site-packages>/torch/lib` → `<site-packages>/nvidia/{nccl,cu13}/include`).
fn nccl_includes(lib: &Path) -> Result<Vec<PathBuf>, String> {
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!("{} has no libtorch_cuda.so (a CPU-only libtorch)", lib.display()));
    }
    // `.libtorch` is a link to the wheel's torch/: follow it to the site-packages holding the nvidia wheels.
    let lib = lib.canonicalize().map_err(|e| format!("{}: {e}", lib.display()))?;
    let site = lib.parent().and_then(Path::parent).ok_or("libtorch is not inside a site-packages")?;
    let nvidia = site.join("nvidia");
    let need = [
        ("nccl/include", "nccl.h", "nvidia-nccl-cu13"),
        ("cu13/include", "cuda_runtime_api.h", "nvidia-cuda-runtime"),
        ("cu13/include", "crt/host_config.h", "nvidia-cuda-crt"),
        ("cu13/include", "nv/target", "nvidia-cuda-cccl"),
    ];
    let mut dirs = Vec::new();
    for (dir, header, wheel) in need {
        let d = nvidia.join(dir);
        if !d.join(header).exists() {
            return Err(format!("{} is missing (pip package {wheel})", d.join(header).display()));
        }
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    Ok(dirs)
}
