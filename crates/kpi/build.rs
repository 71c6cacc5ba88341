//! Records the source revision for `kpi_build_info{revision}`: `KPI_REVISION` when the build
//! sets it (an image built without `.git`), else `git rev-parse`, else `unknown`.

fn main() {
    println!("cargo:rerun-if-env-changed=KPI_REVISION");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    let revision = std::env::var("KPI_REVISION")
        .ok()
        .filter(|revision| !revision.trim().is_empty())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|output| output.status.success())
                .and_then(|output| String::from_utf8(output.stdout).ok())
                .map(|text| text.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=KPI_REVISION={revision}");
}
