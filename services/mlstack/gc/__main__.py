from mlstack.gc.cli import main

raise SystemExit(main())
