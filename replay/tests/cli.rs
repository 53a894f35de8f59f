//! The built `replay` binary: child processes, the table, errors, JSON, plot.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_replay");

/// A fresh folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("replay-test-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SMALL: &str = "# caching-allocator trace v1\n# a small test trace\np 0\na 1 65536\na 2 4096\nf 1\na 3 0\np 1\nf 2\nf 3\na 4 65536\na 5 100\nf 4\np 2\nf 5\na 6 8192\n";

#[test]
fn one_row_per_allocator_with_numeric_columns() {
    let dir = temp_dir("rows");
    let trace = dir.join("small.trace");
    std::fs::write(&trace, SMALL).unwrap();
    let json = dir.join("out.json");
    let svg = dir.join("out.svg");
    let output = Command::new(BIN)
        .arg("--passes")
        .arg("4")
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .arg(&trace)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines
        .iter()
        .position(|line| line.starts_with("allocator"))
        .expect("a header line");
    assert!(
        lines[header - 1].starts_with("small.trace: 3 passes in file, 4 replayed"),
        "{stdout}"
    );
    let rows: Vec<Vec<&str>> = lines[header + 1..header + 7]
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let names: Vec<&str> = rows.iter().map(|row| row[0]).collect();
    assert_eq!(
        names,
        [
            "system",
            "mimalloc",
            "jemalloc",
            "cache",
            "cache-p2d4",
            "cache-p2d4-cap"
        ]
    );
    for row in &rows {
        assert_eq!(row.len(), 15, "{row:?}");
        for cell in &row[1..10] {
            let value: f64 = cell
                .parse()
                .unwrap_or_else(|_| panic!("{cell:?} in {row:?}"));
            assert!(value >= 0.0);
        }
        if row[0].starts_with("cache") {
            let hits: u64 = row[10].parse().unwrap();
            let misses: u64 = row[11].parse().unwrap();
            let ratio: f64 = row[12].parse().unwrap();
            let byte_ratio: f64 = row[13].parse().unwrap();
            let held_x: f64 = row[14].parse().unwrap();
            assert!((0.0..=100.0).contains(&byte_ratio));
            assert!(
                held_x >= 1.0,
                "a cache holds at least the live bytes: {row:?}"
            );
            // Passes 1, 2 and 3 (= the file's pass 0 again) allocate 2 + 1 + 2
            // non-zero blocks; uncapped, the 64 KiB ones and pass 3's are
            // hits (a cap of the peak live bytes gives some back).
            assert_eq!(hits + misses, 5, "{row:?}");
            if !row[0].ends_with("-cap") {
                assert!(hits >= 2, "{row:?}");
            }
            assert!((0.0..=100.0).contains(&ratio));
        } else {
            assert_eq!(&row[10..], ["-", "-", "-", "-", "-"], "{row:?}");
        }
    }
    assert_eq!(rows[0][4], "1.00", "system's ratio to itself");
    assert!(
        stdout.contains("cache stats at the end (small.trace):"),
        "{stdout}"
    );
    assert!(stdout.contains("hits "), "{stdout}");
    assert!(!stdout.contains("warning"), "{stdout}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = json["traces"][0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[3]["allocator"], "cache");
    assert_eq!(rows[3]["pass_ms"].as_array().unwrap().len(), 4);
    assert_eq!(json["traces"][0]["peak_live_bytes"], 65536 + 4096);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("bytes_cached"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn allocators_threads_and_touch_options() {
    let dir = temp_dir("options");
    let trace = dir.join("small.trace");
    std::fs::write(&trace, SMALL).unwrap();
    let output = Command::new(BIN)
        .args([
            "--allocators",
            "cache,system",
            "--threads",
            "2",
            "--touch",
            "full",
        ])
        .args(["--passes", "3", "--gap-ms", "1"])
        .arg(&trace)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("touch full, 2 threads, gap 1 ms"),
        "{stdout}"
    );
    let names: Vec<&str> = stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|words| words.len() == 15 && words[1].parse::<f64>().is_ok())
        .map(|words| words[0])
        .collect();
    assert_eq!(names, ["cache", "system"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn malformed_trace_exits_nonzero_naming_file_and_line() {
    let dir = temp_dir("bad");
    let good = dir.join("good.trace");
    std::fs::write(&good, SMALL).unwrap();
    let bad = dir.join("model.trace");
    std::fs::write(
        &bad,
        "# caching-allocator trace v1\np 0\na 1 64\nf 1\nf 42\n",
    )
    .unwrap();
    let output = Command::new(BIN).arg(&good).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("model.trace:5: free of unknown block id 42"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing ran: the traces are checked before any child starts.
    assert!(!String::from_utf8_lossy(&output.stdout).contains("allocator"));

    let output = Command::new(BIN)
        .arg(dir.join("missing.trace"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.trace: cannot read"));

    let output = Command::new(BIN)
        .args(["--passes", "1"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(!output.status.success(), "one pass leaves no steady pass");
    std::fs::remove_dir_all(&dir).ok();
}
