from clue_mtl.cli import main

raise SystemExit(main())
