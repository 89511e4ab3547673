//! `livepatch demo` runs end to end: the bundled service's output changes when the fix is
//! applied and changes back after the revert.

mod common;

#[test]
fn e2e_demo_shows_before_after_and_reverted_output() {
    let out = std::process::Command::new(common::livepatch_bin())
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = text.find("3. Applying").expect("narrates the apply");
    let reverted = text
        .find("5. Taking the fix back out")
        .expect("narrates the revert");
    let (before, rest) = text.split_at(applied);
    let (after, back) = rest.split_at(reverted - applied);
    assert!(
        before.contains("charged 198") && !before.contains("charged 180"),
        "{text}"
    );
    assert!(
        after.contains("charged 180") && !after.contains("charged 198"),
        "{text}"
    );
    assert!(
        back.contains("charged 198") && !back.contains("charged 180"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colors");
}
