//! Unit tests of the item mapping: keys, diffs, replays.

use super::*;
use crate::test_helpers::{mesh_resource, resource};
use trellis_model::{RouteSpec, VirtualNodeSpec};

fn sample() -> State {
    let mut s = State::default();
    let mut m = mesh_resource("a/b%c");
    m.virtual_nodes
        .insert("n/1".into(), resource("n", VirtualNodeSpec::default()));
    let mut route = resource("x", RouteSpec::default());
    route.client_token = Some("t".into());
    m.routes
        .entry("r".into())
        .or_default()
        .insert("x".into(), route);
    s.meshes.insert("a/b%c".into(), m);
    s.meshes.insert("z".into(), mesh_resource("z"));
    s
}

#[test]
fn items_rebuild_the_same_state_even_with_slashes_and_percents_in_names() {
    let s = sample();
    let it = items(&s).unwrap();
    assert!(
        it.contains_key("mesh/a%2Fb%25c/virtualNode/n%2F1"),
        "{it:?}"
    );
    assert!(it.contains_key("mesh/a%2Fb%25c/virtualRouter/r/route/x"));
    assert_eq!(from_items(&it).unwrap(), s);
}

#[test]
fn a_diff_applied_to_the_old_state_gives_the_new_one() {
    let old = sample();
    let mut new = old.clone();
    new.meshes.remove("z");
    new.meshes.insert("y".into(), mesh_resource("y"));
    let m = new.meshes.get_mut("a/b%c").unwrap();
    m.routes.clear();
    m.virtual_nodes.get_mut("n/1").unwrap().metadata.version = 2;
    let changes = diff(&old, &new).unwrap();
    assert_eq!(changes.len(), 4, "{changes:?}");
    let mut replayed = old.clone();
    apply(&mut replayed, &changes).unwrap();
    assert_eq!(replayed, new);
    assert!(diff(&new, &new).unwrap().is_empty());
}

#[test]
fn deleting_a_mesh_with_its_last_resources_deletes_children_before_the_mesh() {
    let old = sample();
    let mut new = old.clone();
    new.meshes.remove("a/b%c");
    let changes = diff(&old, &new).unwrap();
    assert_eq!(changes.last().unwrap().0, "mesh/a%2Fb%25c");
    let mut replayed = old;
    apply(&mut replayed, &changes).unwrap();
    assert_eq!(replayed, new);
}

#[test]
fn an_empty_route_table_is_no_change_and_is_normalized_away() {
    let old = sample();
    let mut new = old.clone();
    new.meshes
        .get_mut("z")
        .unwrap()
        .routes
        .insert("r".into(), BTreeMap::new());
    assert!(diff(&old, &new).unwrap().is_empty());
    normalize(&mut new);
    assert_eq!(new, old);
}

#[test]
fn a_key_names_the_request_fields_it_is_made_of() {
    assert_eq!(key_fields("mesh/m"), ["meshName"]);
    assert_eq!(
        key_fields(&child_key("m", NODE, "n")),
        ["meshName", "virtualNodeName"]
    );
    assert_eq!(
        key_fields(&grandchild_key("m", GATEWAY, "g", GATEWAY_ROUTE, "r")),
        ["meshName", "virtualGatewayName", "gatewayRouteName"]
    );
    assert!(key_fields("nonsense").is_empty());
}

#[test]
fn a_resource_of_a_missing_mesh_or_a_bad_key_is_an_error_naming_the_item() {
    let mut s = State::default();
    let orphan = vec![("mesh/q/virtualNode/n".to_string(), Some("{}".to_string()))];
    assert!(
        apply(&mut s, &orphan)
            .unwrap_err()
            .to_string()
            .contains("mesh/q")
    );
    let bad = vec![("mesh/q/route/n".to_string(), None)];
    assert!(matches!(apply(&mut s, &bad), Err(ItemError::BadKey(_))));
}
