//! How the demo prints: steps, sizes, durations and indented blocks.

use std::time::Duration;

/// `  3.2s`: seconds with one decimal, right-aligned for columns of timings.
pub fn secs(d: Duration) -> String {
    format!("{:5.1}s", d.as_secs_f64())
}

/// A step's heading.
pub fn step(title: &str) {
    println!("\n== {title}");
}

/// `text` with every line indented under a step.
pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("     {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_blocks_format() {
        assert_eq!(secs(Duration::from_millis(3240)), "  3.2s");
        assert_eq!(indent("a\nb"), "     a\n     b");
    }
}
