from ray_render.cli import main

raise SystemExit(main())
