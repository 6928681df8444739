"""One registry drives the rule, composite and op tests: nothing new ships untested.

A rule added to ``jlrp.rules.__all__`` without a float64 reference in ``test_rules``, a composite
registered without a zennit parity case, or an op kind without a type group fails here.
"""

from __future__ import annotations

import test_lxt_parity
import test_rules
import test_transformer_rules
import test_zennit_parity

from jlrp import composites, ops, rules, types


def test_every_rule_has_a_float64_reference():
    referenced = test_rules.REFERENCED | test_transformer_rules.REFERENCED
    assert set(rules.__all__) == {cls.__name__ for cls in referenced}


def test_every_composite_is_checked_against_zennit_or_lxt():
    transformer = set(test_lxt_parity.COMPOSITES)  # the transformer composites, checked against lxt
    assert set(composites.COMPOSITES) == set(test_zennit_parity.ZENNIT) | transformer
    assert {name for _, name in test_zennit_parity.CASES} == set(composites.COMPOSITES) - transformer


def test_every_op_kind_has_a_type_group_and_a_default():
    groups = [getattr(types, name) for name in types.__all__]
    base = composites.layer_map_base()
    for name in ops.__all__:
        cls = getattr(ops, name)
        if not (isinstance(cls, type) and issubclass(cls, ops.Op) and cls is not ops.Op):
            continue
        assert any(cls in group for group in groups), name
        op = cls("p", "@p")
        assert any(isinstance(op, key) for key, _ in base), f"{name} has no rule in layer_map_base"
