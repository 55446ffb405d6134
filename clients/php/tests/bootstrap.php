<?php

declare(strict_types=1);

// Composer's autoloader when installed; else the package's PSR-4 map by hand (the tests run
// with Debian's phpunit and nothing fetched).
$composer = __DIR__ . '/../vendor/autoload.php';
if (is_file($composer)) {
    require $composer;
} else {
    spl_autoload_register(static function (string $class): void {
        if (str_starts_with($class, 'Bwp\\')) {
            $file = __DIR__ . '/../src/' . str_replace('\\', '/', substr($class, 4)) . '.php';
            if (is_file($file)) {
                require $file;
            }
        }
    });
}
