//! The model's two string patterns, written out (no regex engine for two character classes).

use super::validate::FieldError;

/// `AwsCloudMapInstanceAttributeKey`: `^[a-zA-Z0-9!-~]+$` — one or more printable ASCII, no spaces.
pub(super) fn aws_cloud_map_instance_attribute_key(path: &str, v: &str) -> Result<(), FieldError> {
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_graphic()) {
        return Err(FieldError::new(
            path,
            format!("{v:?} must be printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// `AwsCloudMapInstanceAttributeValue`: printable ASCII, spaces allowed only between other
/// characters (the pattern's middle class also admits a no-break space).
pub(super) fn aws_cloud_map_instance_attribute_value(
    path: &str,
    v: &str,
) -> Result<(), FieldError> {
    let inner_ok = |c: char| c.is_ascii_graphic() || c == ' ' || c == '\u{a0}';
    let chars: Vec<char> = v.chars().collect();
    let ok = match chars.as_slice() {
        [] => true,
        [only] => only.is_ascii_graphic(),
        [first, middle @ .., last] => {
            first.is_ascii_graphic()
                && last.is_ascii_graphic()
                && middle.iter().all(|c| inner_ok(*c))
        }
    };
    if !ok {
        return Err(FieldError::new(
            path,
            format!("{v:?} must be printable ASCII, with spaces only between other characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_patterns_follow_the_model() {
        assert!(aws_cloud_map_instance_attribute_key("k", "ECS_SERVICE_NAME").is_ok());
        assert!(aws_cloud_map_instance_attribute_key("k", "a b").is_err());
        assert!(aws_cloud_map_instance_attribute_key("k", "").is_err());
        assert!(aws_cloud_map_instance_attribute_value("v", "").is_ok());
        assert!(aws_cloud_map_instance_attribute_value("v", "blue green").is_ok());
        assert!(aws_cloud_map_instance_attribute_value("v", " blue").is_err());
        assert!(aws_cloud_map_instance_attribute_value("v", "é").is_err());
    }
}
