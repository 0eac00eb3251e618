//! The command-line contract: binaries, subcommands, env-backed flags, clear errors.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use geossl_tests::{run, text};

#[test]
fn help_lists_the_contracted_subcommands() {
    for (bin, subs) in [
        ("geossl-train", &["pretrain", "probe", "finetune", "segment"][..]),
        ("geossl-export", &["onnx", "import"][..]),
        ("geossl-serve", &["serve", "embed"][..]),
    ] {
        let o = run(bin, &["--help"]);
        assert!(o.status.success(), "{bin} --help failed: {}", text(&o));
        let t = text(&o);
        for s in subs {
            assert!(t.contains(s), "{bin} --help does not list `{s}`:\n{t}");
        }
        for s in subs {
            let o = run(bin, &[s, "--help"]);
            assert!(o.status.success(), "{bin} {s} --help failed: {}", text(&o));
        }
    }
    // Every flag has an environment variable.
    let t = text(&run("geossl-export", &["onnx", "--help"]));
    assert!(t.contains("[env: GEOSSL_CHECKPOINT=]") && t.contains("[env: GEOSSL_OPSET=]"), "{t}");
    let t = text(&run("geossl-serve", &["serve", "--help"]));
    assert!(t.contains("[env: GEOSSL_MODEL_REPOSITORY=]") && t.contains("[env: GEOSSL_PORT=]"), "{t}");
}

#[test]
fn init_then_info_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("r18");
    let ck_s = ck.to_str().unwrap();
    let o = run("geossl-train", &["init", "--arch", "resnet18", "--input-size", "64", "--projection", "--out", ck_s]);
    assert!(o.status.success(), "{}", text(&o));
    let spec: geossl_models::ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(ck.join("spec.json")).unwrap()).unwrap();
    assert_eq!(spec.backbone.arch, geossl_models::Arch::Resnet18);
    assert_eq!(spec.projection_out(), Some(128));
    let o = run("geossl-train", &["info", "--checkpoint", ck_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resnet18") && text(&o).contains("libtorch cuda runtime loaded: true"), "{}", text(&o));

    // Errors are one clear line naming the problem, not a panic or a backtrace.
    let missing = dir.path().join("nope");
    let o = run("geossl-train", &["info", "--checkpoint", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: ") && err.contains("nope") && err.lines().count() == 1, "{err}");
    let o = run("geossl-train", &["init", "--arch", "vgg16", "--out", ck_s]);
    assert!(!o.status.success() && text(&o).contains("vgg16"), "{}", text(&o));
    let o = run("geossl-train", &["init", "--bands", "0", "--out", ck_s]);
    assert!(!o.status.success() && text(&o).contains("in_channels"), "{}", text(&o));
    // The failed inits left the earlier checkpoint intact.
    assert!(run("geossl-train", &["info", "--checkpoint", ck_s]).status.success());

    // train → export: the checkpoint becomes an ONNX file; a head it lacks is a clear error and no file.
    let onnx = dir.path().join("m.onnx");
    let onnx_s = onnx.to_str().unwrap();
    let o = run("geossl-export", &["onnx", "--checkpoint", ck_s, "--out", onnx_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::metadata(&onnx).unwrap().len() > 40_000_000, "ResNet-18 weights are in the file");
    let bad = dir.path().join("c.onnx");
    let o = run("geossl-export", &["onnx", "--checkpoint", ck_s, "--head", "classify", "--out", bad.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("no classifier head"), "{}", text(&o));
    assert!(!bad.exists());

    // The server refuses a missing model repository by name, before binding anything.
    let missing = dir.path().join("no-such-repo");
    let o = run("geossl-serve", &["serve", "--model-repository", missing.to_str().unwrap(), "--port", "0"]);
    assert!(!o.status.success() && text(&o).contains("no-such-repo"), "{}", text(&o));
}
