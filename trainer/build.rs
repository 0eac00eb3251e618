//! Links libtorch so the same binary uses CUDA wherever a GPU is present.
//!
//! * `-rpath <libtorch>/lib`: the binary finds libtorch without LD_LIBRARY_PATH.
//! * `--no-as-needed -ltorch -ltorch_cuda`: nothing references libtorch_cuda
//!   directly, so the linker would drop it and CUDA would be silently
//!   unavailable; keeping it makes `tch::utils::has_cudart()` true.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    } else {
        println!("cargo:warning=libtorch at {lib} has no libtorch_cuda.so: CPU-only build");
    }
}
