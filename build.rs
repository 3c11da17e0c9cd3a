//! Stamps the binary with what `outbox-relay --version`, the start-up log line and the
//! `outbox_relay_build_info` metric report: the git commit it was built from and the build
//! date.
//!
//! - The commit comes from `OUTBOX_RELAY_COMMIT` when set (a build from a source tarball has
//!   no git), else `git rev-parse`, else `unknown`. It is the commit checked out: a build
//!   with uncommitted changes says so nowhere (tracking them would rebuild on every edit).
//! - The date is UTC, from `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
//! - A new commit reruns this script (it watches HEAD and the branch's ref, where they are
//!   files: a path that does not exist would rerun it on every build).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=OUTBOX_RELAY_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for reference in ["HEAD"].into_iter().chain(branch.as_deref()) {
        if let Some(file) = git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            reference,
        ])
        .filter(|file| std::path::Path::new(file).is_file())
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    let commit = std::env::var("OUTBOX_RELAY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=OUTBOX_RELAY_COMMIT={commit}");
    println!("cargo:rustc-env=OUTBOX_RELAY_BUILD_DATE={}", date(seconds));
}

/// One line of git's output, or None where there is no git or no repository.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_owned())
}

/// `YYYY-MM-DD` (UTC) of a Unix time: Howard Hinnant's days-to-civil algorithm.
fn date(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
