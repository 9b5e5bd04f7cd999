"""Attacks of one member (or public participant) on every default policy, and explicit ones.

Each test runs one attack (see :mod:`privacy_attacks`) over a policy's run, records what it learned
for docs/PRIVACY.md, and asserts the bound of the table: it fails when a default lets the
attack learn more. Checks of the harness itself (the attack had material, its derivations
are sound) come first, so a broken harness never passes as a held bound.
"""

from __future__ import annotations

from collections.abc import Callable

import privacy_attacks as attacks
import pytest
from privacy_report import ATTACKS, record
from privacykit import POLICIES, Capture, Policy

from pear_mqtt.model.insight import NetworkMode

BY_POLICY = [pytest.param(p, id=p.id) for p in POLICIES]

CaptureOf = Callable[[Policy], Capture]


def judge(attack: str, capture: Capture, finding: attacks.Finding) -> None:
    """Record the finding, then assert its bound."""
    record(attack=attack, policy=capture.policy.name, levels=capture.levels,
           learned=finding.learned, bound=finding.bound, held=finding.held,
           metrics=finding.metrics, order=capture.policy.order)
    assert finding.held, (f"{ATTACKS[attack][0]} under {capture.policy.name!r} learned more "
                          f"than allowed: {finding.learned} (allowed: {finding.bound})")


@pytest.mark.parametrize("policy", BY_POLICY)
def test_a_dictionary_reverses_no_pseudonym(capture_of: CaptureOf, policy: Policy) -> None:
    capture = capture_of(policy)
    finding = attacks.dictionary(capture)
    assert finding.metrics["keys_tried"] > 0  # it did read its own config
    judge("a", capture, finding)


@pytest.mark.parametrize("policy", BY_POLICY)
def test_b_combined_fields_keep_every_price_within_its_bucket(capture_of: CaptureOf,
                                                              policy: Policy) -> None:
    capture = capture_of(policy)
    finding = attacks.interval(capture)
    assert finding.metrics["unsound"] == 0, "an interval excluded the true price"
    judge("b", capture, finding)


@pytest.mark.parametrize("policy", BY_POLICY)
def test_c_no_published_number_equals_a_withheld_value(capture_of: CaptureOf,
                                                       policy: Policy) -> None:
    capture = capture_of(policy)
    judge("c", capture, attacks.linking(capture))


@pytest.mark.parametrize("policy", BY_POLICY)
def test_d_no_clear_name_or_cross_network_link(capture_of: CaptureOf, policy: Policy) -> None:
    capture = capture_of(policy)
    if policy.mode is NetworkMode.PRIVATE:
        assert capture.private_attempts, "the attacker did not try the private broker"
    else:  # it read the brokers it belongs to (at least its own presence)
        assert any(attacks.own_message(capture, m) for m in capture.wire)
    judge("d", capture, attacks.names(capture))


@pytest.mark.parametrize("policy", BY_POLICY)
def test_e_resends_and_replays_do_not_move_aggregates(capture_of: CaptureOf,
                                                     policy: Policy) -> None:
    capture = capture_of(policy)
    if policy.mode is not NetworkMode.PRIVATE:
        assert capture.resent, "the attacker re-sent nothing"
    judge("e", capture, attacks.skew(capture))


@pytest.mark.parametrize("policy", BY_POLICY)
def test_f_differencing_aggregates_isolates_no_company(capture_of: CaptureOf,
                                                      policy: Policy) -> None:
    capture = capture_of(policy)
    judge("f", capture, attacks.differencing(capture))
