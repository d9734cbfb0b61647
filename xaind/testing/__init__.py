"""What the test suite shares, shipped with the package as `twisted.internet.testing` is.

The suite runs both from the source tree and against the installed Debian
package (from a directory outside the source tree), so its shared parts live
in the package rather than on a `sys.path` entry of the tests' own:

- `xaind.testing.fakes`: one fake per collaborator, each checked against the
  interface it stands for (tests/test_fakes.py);
- `xaind.testing.waiting`: bounded waits for tests running on the reactor;
- `xaind.testing.wire`: whole-buffer encoders and parsers of the upload wire
  format, the reference the streaming parser is checked against.

The fixtures built on them are in tests/conftest.py.
"""
