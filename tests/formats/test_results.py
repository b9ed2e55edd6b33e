from gcupipe.formats.results import Finding


def test_a_finding_naming_a_key_with_control_characters_stays_one_line():
    # a JSON key or tensor name comes from the file being checked, so it may hold anything
    finding = Finding('key "a\nb\t" is unknown', "remove \x1b[31m")
    assert finding.message == 'key "a\\nb\\t" is unknown'
    assert finding.fix == "remove \\x1b[31m"
    assert Finding("plain — ünïcode", "ok").message == "plain — ünïcode"
