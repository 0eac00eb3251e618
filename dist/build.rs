//! Compiles the c10d shim against the libtorch that tch links (its headers
//! ship in the torch wheel) and gloo's headers (Debian's `libgloo-dev`; the
//! wheel has gloo's code inside libtorch_cpu but not its headers).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh");
    let torch = Path::new(&lib).parent().expect("libtorch/lib has a parent");
    let gloo = ["/usr/include/gloo/config.h", "/usr/local/include/gloo/config.h"];
    if !gloo.iter().any(|p| Path::new(p).exists()) {
        panic!("gloo's headers are missing (apt-get install libgloo-dev; scripts/setup.sh does it)");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("geossl_c10d_shim");
    // gloo's symbols live in libtorch_cpu; keep the libraries even if nothing seems to use them yet.
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for l in ["torch", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}
