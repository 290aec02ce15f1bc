"""The soak benchmark's bounded run, against a real server: while two tenants upload, train, move aliases and
delete versions, two others predict at high concurrency over HTTP and gRPC, and no answer is wrong or a 5xx.

(Its latency and memory figures are performance targets, measured by `python benchmarks/soak.py` and quoted in
the README; a test never asserts a timing.)
"""

from soak import PROFILES, run_soak


def test_no_request_fails_or_gets_a_wrong_answer_while_other_tenants_train_and_delete(tmp_path):
    result = run_soak(PROFILES["short"], tmp_path)
    assert result["requests"] > 100, result
    assert result["errors_5xx"] == 0, result["problems"]
    assert result["wrong_answers"] == 0, result["problems"]
    assert result["refused_429"] == 0, result["problems"]
