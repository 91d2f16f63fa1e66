"""`python -m hingeloss_server`: the same as `hingeloss-server`."""

from hingeloss_server.cli import main

raise SystemExit(main())
