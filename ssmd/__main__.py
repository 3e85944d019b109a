from ssmd.cli import main

raise SystemExit(main())
