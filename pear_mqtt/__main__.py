"""``python -m pear_mqtt``: the same as the ``pear-mqtt`` console script."""

from .cli.main import main

raise SystemExit(main())
