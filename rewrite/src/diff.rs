//! A unified line diff (Myers' algorithm), so `--diff` can show what meshing changes without another
//! dependency. Inputs are pretty-printed task definitions: a few hundred lines, a few dozen edits.

/// One step of the edit script, by line index into the old (`a`) or new (`b`) text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal(usize, usize),
    Delete(usize),
    Insert(usize),
}

/// Lines of context around each change, as `diff -u` uses.
const CONTEXT: usize = 3;

/// A unified diff of `old` and `new` with `---`/`+++` headers named by the labels; empty when they are
/// equal.
pub fn unified(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let ops = edit_script(&a, &b);
    let changed: Vec<usize> = (0..ops.len())
        .filter(|&i| !matches!(ops[i], Op::Equal(..)))
        .collect();
    if changed.is_empty() {
        return String::new();
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    let mut i = 0;
    while i < changed.len() {
        // A hunk runs from CONTEXT lines before a change to CONTEXT lines after the last change that
        // is no more than 2 * CONTEXT equal lines from the previous one.
        let start = changed[i].saturating_sub(CONTEXT);
        let mut last = changed[i];
        while i + 1 < changed.len() && changed[i + 1] - last <= 2 * CONTEXT + 1 {
            i += 1;
            last = changed[i];
        }
        let end = (last + CONTEXT + 1).min(ops.len());
        hunk(&mut out, &ops[start..end], &a, &b);
        i += 1;
    }
    out
}

fn hunk(out: &mut String, ops: &[Op], a: &[&str], b: &[&str]) {
    // Where the hunk starts in each file: the first line of that file it touches, or (when it touches
    // none, as a pure insertion at the start) the line before it.
    let (mut a_start, mut b_start) = (None, None);
    let (mut a_len, mut b_len) = (0, 0);
    let (mut a_next, mut b_next) = (0, 0);
    for op in ops {
        match *op {
            Op::Equal(x, y) => {
                a_start.get_or_insert(x);
                b_start.get_or_insert(y);
                a_len += 1;
                b_len += 1;
                (a_next, b_next) = (x + 1, y + 1);
            }
            Op::Delete(x) => {
                a_start.get_or_insert(x);
                a_len += 1;
                a_next = x + 1;
            }
            Op::Insert(y) => {
                b_start.get_or_insert(y);
                b_len += 1;
                b_next = y + 1;
            }
        }
    }
    // `diff -u` numbers lines from 1, and an empty range by the line before it.
    let pos = |start: Option<usize>, next: usize, len: usize| match start {
        Some(s) if len > 0 => s + 1,
        _ => next,
    };
    out.push_str(&format!(
        "@@ -{},{a_len} +{},{b_len} @@\n",
        pos(a_start, a_next, a_len),
        pos(b_start, b_next, b_len)
    ));
    for op in ops {
        let (sign, line) = match *op {
            Op::Equal(x, _) => (' ', a[x]),
            Op::Delete(x) => ('-', a[x]),
            Op::Insert(y) => ('+', b[y]),
        };
        out.push(sign);
        out.push_str(line);
        out.push('\n');
    }
}

/// The shortest edit script from `a` to `b` (Myers 1986, with the per-round frontier kept for the
/// backtrack), in forward order.
fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = n + m;
    let idx = |k: isize| (k + max) as usize;
    let mut v = vec![0isize; 2 * max as usize + 2];
    let mut trace = Vec::new();
    'search: for d in 0..=max {
        trace.push(v.clone());
        for k in (-d..=d).step_by(2) {
            let mut x = if k == -d || (k != d && v[idx(k - 1)] < v[idx(k + 1)]) {
                v[idx(k + 1)]
            } else {
                v[idx(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[idx(k)] = x;
            if x >= n && y >= m {
                break 'search;
            }
        }
    }

    let mut ops = Vec::new();
    let (mut x, mut y) = (n, m);
    for (d, v) in trace.iter().enumerate().rev() {
        let d = d as isize;
        let k = x - y;
        let prev_k = if k == -d || (k != d && v[idx(k - 1)] < v[idx(k + 1)]) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = v[idx(prev_k)];
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            ops.push(Op::Equal(x as usize - 1, y as usize - 1));
            x -= 1;
            y -= 1;
        }
        if d > 0 {
            if x == prev_x {
                ops.push(Op::Insert(y as usize - 1));
            } else {
                ops.push(Op::Delete(x as usize - 1));
            }
        }
        (x, y) = (prev_x, prev_y);
    }
    ops.reverse();
    ops
}

#[cfg(test)]
mod tests {
    use super::unified;

    #[test]
    fn equal_texts_give_no_diff() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "x", "y"), "");
        assert_eq!(unified("", "", "x", "y"), "");
    }

    #[test]
    fn changes_far_apart_make_two_hunks() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n";
        let new = "1\nTWO\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n13\n";
        assert_eq!(
            unified(old, new, "before", "after"),
            "--- before\n+++ after\n\
             @@ -1,5 +1,5 @@\n 1\n-2\n+TWO\n 3\n 4\n 5\n\
             @@ -10,3 +10,4 @@\n 10\n 11\n 12\n+13\n"
        );
    }

    #[test]
    fn insertions_at_either_end_and_into_empty() {
        assert_eq!(
            unified("b\n", "a\nb\n", "o", "n"),
            "--- o\n+++ n\n@@ -1,1 +1,2 @@\n+a\n b\n"
        );
        assert_eq!(
            unified("", "a\n", "o", "n"),
            "--- o\n+++ n\n@@ -0,0 +1,1 @@\n+a\n"
        );
        assert_eq!(
            unified("a\nb\n", "", "o", "n"),
            "--- o\n+++ n\n@@ -1,2 +0,0 @@\n-a\n-b\n"
        );
    }

    #[test]
    fn close_changes_share_a_hunk() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\n";
        let new = "a\nB\nc\nd\ne\nf\nG\nh\n";
        assert_eq!(
            unified(old, new, "o", "n"),
            "--- o\n+++ n\n@@ -1,8 +1,8 @@\n a\n-b\n+B\n c\n d\n e\n f\n-g\n+G\n h\n"
        );
    }
}
