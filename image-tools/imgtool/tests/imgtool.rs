//! Runs the real `imgtool` binary: chunk → inspect → verify (ok and corrupted) → diff.

use std::path::Path;
use std::process::{Command, Output};

use metalrack_image_tools::manifest::Manifest;
use metalrack_image_tools::testdata::random_bytes;
use metalrack_image_tools::Hash;

fn imgtool(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgtool")).args(args).output().expect("imgtool runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn assert_success(output: &Output) {
    assert!(output.status.success(), "status {:?}, stderr: {}", output.status, stderr(output));
}

#[test]
fn chunk_inspect_verify_diff() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image-v1.img");
    let manifest_path = dir.path().join("image-v1.manifest");
    let data = random_bytes(3 * 1024 * 1024 + 321, 7);
    std::fs::write(&image, &data).unwrap();

    // chunk
    let output = imgtool(&[Path::new("chunk"), &image, Path::new("-o"), &manifest_path]);
    assert_success(&output);
    let manifest = Manifest::parse(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest.file_len, data.len() as u64);
    assert_eq!(manifest.file_hash, Hash::of(&data));
    let summary = stdout(&output);
    assert!(summary.contains(&format!("{} chunks", manifest.chunks.len())), "{summary}");
    assert!(summary.contains(&format!("{} bytes", data.len())), "{summary}");
    assert!(summary.contains(&Hash::of(&data).to_hex()), "{summary}");
    // Not a terminal: no progress bar escape codes on stderr.
    assert_eq!(stderr(&output), "");

    // inspect
    let output = imgtool(&[Path::new("inspect"), &manifest_path]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains(&format!("file length   {} bytes", data.len())), "{text}");
    assert!(text.contains(&format!("file hash     {}", Hash::of(&data))), "{text}");
    assert!(text.contains(&format!("chunks        {}\n", manifest.chunks.len())), "{text}");
    assert!(text.contains("chunk length  min "), "{text}");

    let output = imgtool(&[Path::new("inspect"), &manifest_path, Path::new("--chunks")]);
    assert_success(&output);
    let text = stdout(&output);
    let chunk_lines: Vec<&str> =
        text.lines().skip_while(|line| !line.trim_start().starts_with("index")).skip(1).collect();
    assert_eq!(chunk_lines.len(), manifest.chunks.len(), "{text}");
    for (line, (index, (offset, chunk))) in chunk_lines.iter().zip(manifest.chunk_offsets().enumerate()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields, [index.to_string(), offset.to_string(), chunk.len.to_string(), chunk.hash.to_hex()]);
    }

    // verify: ok
    let output = imgtool(&[Path::new("verify"), &image, &manifest_path]);
    assert_success(&output);
    assert_eq!(stdout(&output), "ok\n");

    // verify: one flipped byte in the fourth chunk
    let (bad_offset, bad_chunk) = manifest.chunk_offsets().nth(3).unwrap();
    let flip_at = (bad_offset + u64::from(bad_chunk.len) / 2) as usize;
    let mut damaged = data.clone();
    damaged[flip_at] ^= 0x80;
    let damaged_image = dir.path().join("damaged.img");
    std::fs::write(&damaged_image, &damaged).unwrap();
    let output = imgtool(&[Path::new("verify"), &damaged_image, &manifest_path]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stdout(&output), "");
    let message = stderr(&output);
    assert!(message.starts_with("imgtool: error: verifying "), "{message}");
    assert!(message.contains(&format!("chunk 3 (at byte offset {bad_offset})")), "{message}");

    // diff: a second version with 100 bytes inserted in the middle
    let mut v2 = data.clone();
    v2.splice(data.len() / 2..data.len() / 2, random_bytes(100, 8));
    let image_v2 = dir.path().join("image-v2.img");
    let manifest_v2_path = dir.path().join("image-v2.manifest");
    std::fs::write(&image_v2, &v2).unwrap();
    assert_success(&imgtool(&[Path::new("chunk"), &image_v2, Path::new("-o"), &manifest_v2_path]));
    let manifest_v2 = Manifest::parse(&std::fs::read(&manifest_v2_path).unwrap()).unwrap();
    let expected = metalrack_image_tools::diff::diff(&manifest, &manifest_v2);
    assert!(expected.chunks_to_move >= 1 && expected.chunks_to_move <= 3, "{expected:?}");

    let output = imgtool(&[Path::new("diff"), &manifest_path, &manifest_v2_path]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains(&format!("shared    {} distinct chunks", expected.chunks_shared)), "{text}");
    assert!(
        text.contains(&format!(
            "to move   {} distinct chunks, {} bytes",
            expected.chunks_to_move, expected.bytes_to_move
        )),
        "{text}"
    );
    assert!(!text.contains("identical"), "{text}");

    let output = imgtool(&[Path::new("diff"), &manifest_path, &manifest_path]);
    assert_success(&output);
    assert!(stdout(&output).contains("to move   0 distinct chunks, 0 bytes"));
    assert!(stdout(&output).contains("the files are identical"));
}

/// `imgtool chunk FILE` maps a regular file and splits it between threads; `imgtool chunk
/// /dev/stdin` fed by a pipe streams it on one thread. Both must write the same manifest.
#[test]
fn chunk_of_a_pipe_matches_chunk_of_the_file() {
    use std::io::Write;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    // Over two of the chunker's 4 MiB segments, so a two-core machine splits it.
    let data = random_bytes(9 * 1024 * 1024 + 5, 8);
    std::fs::write(&image, &data).unwrap();
    let from_file = dir.path().join("from-file.manifest");
    assert_success(&imgtool(&[Path::new("chunk"), &image, Path::new("-o"), &from_file]));

    let from_pipe = dir.path().join("from-pipe.manifest");
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgtool"))
        .args([Path::new("chunk"), Path::new("/dev/stdin"), Path::new("-o"), &from_pipe])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_success(&output);

    let file_manifest = std::fs::read(&from_file).unwrap();
    assert_eq!(std::fs::read(&from_pipe).unwrap(), file_manifest);
    assert!(Manifest::parse(&file_manifest).unwrap().chunks.len() > 50);
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_manifest = dir.path().join("notes.txt");
    std::fs::write(&not_a_manifest, b"hello, world").unwrap();
    let output = imgtool(&[Path::new("inspect"), &not_a_manifest]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.starts_with("imgtool: error: reading manifest "), "{message}");
    assert!(message.contains("not a Metalrack manifest"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");

    let missing = dir.path().join("missing.img");
    let output = imgtool(&[Path::new("chunk"), &missing, Path::new("-o"), &dir.path().join("m")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("cannot open"), "{}", stderr(&output));

    let output = imgtool(&[
        Path::new("chunk"),
        &not_a_manifest,
        Path::new("-o"),
        &dir.path().join("m"),
        Path::new("--max-kib"),
        Path::new("8"),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("invalid chunker configuration"), "{}", stderr(&output));
}

#[test]
fn help_teaches() {
    let output = imgtool(&[Path::new("--help")]);
    assert_success(&output);
    let text = stdout(&output);
    for word in ["chunk", "inspect", "diff", "verify", "Examples:"] {
        assert!(text.contains(word), "--help lacks {word:?}: {text}");
    }
}
