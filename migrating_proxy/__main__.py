from migrating_proxy.cli import main

raise SystemExit(main())
