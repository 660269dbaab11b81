"""`nsft-ray submit` to a head with Ray's token auth but no token on the client: one line that
says what to set (RAY_AUTH_MODE=token), exit 2, no traceback. (Checked by hand against a real
head: Ray answers "Unauthorized: Missing authentication token", the case stubbed here.)"""

from nsft_ray.cli import main


def test_missing_token_names_ray_auth_mode(monkeypatch, capsys):
    from ray.exceptions import AuthenticationError

    import nsft_ray.ray_glue.submit as submit

    class RefusingClient:  # what JobSubmissionClient raises when the head wants a token
        def __init__(self, address: str):
            raise AuthenticationError("Authentication required: Unauthorized: Missing "
                                      "authentication token")

    monkeypatch.setattr(submit, "JobSubmissionClient", RefusingClient)
    code = main(["submit", "--address", "http://127.0.0.1:8265", "--", "python", "jobs/world.py"])
    err = capsys.readouterr().err
    assert code == 2
    assert "RAY_AUTH_MODE=token" in err and "Missing authentication token" in err
    assert "Traceback" not in err
